"""The control state survives a Redis reset: a redis-server with no persistence is killed
(-9) and started again empty; replicas must follow the next write at once, not ignore it
until the generation climbs past the one they served."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from monitor.keys import Keys
from monitor.state import ControlDefaults, ControlState, ControlStore, ControlUpdate, supersedes
from serving.replica.control import StateFollower
from tests.support import RedisServer, until


@pytest.fixture
def volatile_redis(tmp_path):
    """A redis-server of this test's own with no persistence: killed, it comes back empty."""
    with RedisServer(tmp_path, aof=False) as server:
        yield server


def test_supersedes_compares_generations_only_within_an_epoch():
    a5 = ControlState(generation=5, epoch="a")
    assert supersedes(ControlState(generation=6, epoch="a"), a5)
    assert not supersedes(ControlState(generation=5, epoch="a"), a5)
    assert not supersedes(ControlState(generation=2, epoch="a"), a5)
    assert supersedes(ControlState(generation=2, epoch="b"), a5)  # a new document: lower is fine
    assert supersedes(ControlState(generation=1, epoch="b"), None)
    # documents written before epochs existed parse with "" and keep comparing by generation
    legacy = ControlState.model_validate_json('{"generation": 3}')
    assert legacy.epoch == "" and not supersedes(ControlState(generation=2), legacy)


def test_replicas_follow_a_write_at_once_after_redis_restarted_empty(volatile_redis):
    """The issue's reproduction: generation 5 served, Redis killed and restarted with no data,
    then one write. Before epochs the replicas ignored it (generation 2 < 5)."""
    store = ControlStore(redis.Redis.from_url(volatile_redis.url), "ep")
    store.ensure(ControlDefaults())

    async def scenario():
        applied: list[ControlState] = []

        async def apply(state):
            applied.append(state)

        # reconcile_s 30: only the notification or the resubscription may bring a change
        followers = [StateFollower(volatile_redis.url, "ep", f"llm{i}", ControlDefaults(), apply, 30.0)
                     for i in range(2)]
        for f in followers:
            await f.start()
        for sparsity in (0.1, 0.2, 0.3, 0.4):
            last = await asyncio.to_thread(store.update, ControlUpdate(sparsity=sparsity), "test")
        await until(lambda: all(f.state.generation == last.generation for f in followers))
        assert last.generation == 5

        volatile_redis.kill()
        volatile_redis.start()  # empty: no persistence
        # the followers notice the missing document and write back what they serve (one wins)
        reseed_s = await until(lambda: all(f.state.epoch != last.epoch for f in followers))
        seeded = await asyncio.to_thread(store.get)
        assert seeded is not None and seeded.epoch != last.epoch
        assert seeded.sparsity == 0.4 and seeded.generation == 5  # nothing the replicas served is lost
        assert {f.state.epoch for f in followers} == {seeded.epoch}

        t0 = time.monotonic()
        put = await asyncio.to_thread(store.update, ControlUpdate(sparsity=0.05, fallback="dense"), "admin-api")
        await until(lambda: all(f.state.sparsity == 0.05 and f.state.fallback == "dense" for f in followers))
        follow_s = time.monotonic() - t0
        reports = await asyncio.to_thread(store.replica_reports, 60)
        for f in followers:
            await f.stop()
        return put, reseed_s, follow_s, reports

    put, reseed_s, follow_s, reports = asyncio.run(scenario())
    assert put.generation == 6
    assert reseed_s < 5.0 and follow_s < 1.0
    assert len(reports) == 2 and {r["epoch"] for r in reports} == {put.epoch}


def test_a_lower_generation_of_a_new_document_is_followed(volatile_redis):
    """A writer that recreates the document first (defaults, generation 1, a new epoch) wins
    over the replicas' re-seed; they follow it although its generation is lower."""
    r = redis.Redis.from_url(volatile_redis.url)
    store = ControlStore(r, "ep2")
    store.ensure(ControlDefaults())

    async def scenario():
        seen: list[int] = []

        async def apply(state):
            seen.append(state.generation)

        f = StateFollower(volatile_redis.url, "ep2", "llm", ControlDefaults(), apply, 30.0)
        await f.start()
        for s in (0.1, 0.2, 0.3):
            last = await asyncio.to_thread(store.update, ControlUpdate(sparsity=s), "test")
        await until(lambda: f.state.generation == last.generation)
        # another document replaces it at generation 2 (what an empty Redis + one PUT gives)
        other = ControlState(generation=2, epoch="fresh", sparsity=0.7)
        await asyncio.to_thread(r.set, store.key, other.model_dump_json())
        await asyncio.to_thread(r.publish, store.channel, "2")
        await until(lambda: f.state.epoch == "fresh", timeout=2.0)
        state = f.state
        await f.stop()
        return seen, state

    seen, state = asyncio.run(scenario())
    # notifications may coalesce (the newest document is read), never go back within an epoch
    assert seen[0] == 1 and seen[-2:] == [4, 2] and seen[:-1] == sorted(seen[:-1]) and state.sparsity == 0.7


def test_update_without_a_document_starts_a_new_epoch(volatile_redis):
    store = ControlStore(redis.Redis.from_url(volatile_redis.url), "ep3")
    first = store.ensure(ControlDefaults())
    store.r.delete(store.key)
    new = store.update(ControlUpdate(sparsity=0.3), "admin-api")
    assert new.epoch and new.epoch != first.epoch and new.generation == 2
    assert store.reseed(first, "test") is None  # a document exists: nothing written
    store.r.delete(store.key)
    back = store.reseed(new, "test")
    assert back is not None and back.epoch not in (new.epoch, "") and back.sparsity == 0.3
    assert store.get() == back and store.changes("0-0")[-1][1] == back


def test_aof_redis_killed_under_writes_loses_no_acknowledged_write_and_followers_resume(tmp_path):
    """kill -9 of a redis-server with AOF while a writer streams entries and alerts: every id
    Redis returned is there after the restart; the document (same epoch) is followed again
    within a second of the restart."""
    import threading

    from monitor.alerts import AlertSettings, AlertStore

    server = RedisServer(tmp_path, aof=True).start()
    acked: dict[str, list] = {"probe": [], "alerts": []}
    stop = threading.Event()

    def writer():
        r, i = redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1), 0
        alerts = AlertStore(r, "aof", AlertSettings())
        while not stop.is_set():
            try:
                acked["probe"].append(r.xadd("aof:probe", {"i": str(i)}).decode())
                a = alerts.raise_alert("recovered", "info", f"probe {i}", dedup_key=f"probe:{i}")
                acked["alerts"].append(a.id)
                i += 1
            except (redis.RedisError, OSError):
                time.sleep(0.05)

    store = ControlStore(redis.Redis.from_url(server.url), "aof")
    store.ensure(ControlDefaults())
    try:
        async def scenario():
            async def apply(state):
                pass

            f = StateFollower(server.url, "aof", "llm", ControlDefaults(), apply, 30.0)
            await f.start()
            put = await asyncio.to_thread(store.update, ControlUpdate(sparsity=0.3), "test")
            await until(lambda: f.state.generation == put.generation)
            w = threading.Thread(target=writer, daemon=True)
            w.start()
            await asyncio.sleep(1.0)
            server.kill()
            await asyncio.sleep(1.0)
            server.start()
            t_up = time.monotonic()
            new = await asyncio.to_thread(store.update, ControlUpdate(sparsity=0.2), "admin-api")
            await until(lambda: f.state.generation == new.generation)
            follow_s = time.monotonic() - t_up
            await asyncio.sleep(0.5)
            stop.set()
            w.join(10)
            state = f.state
            await f.stop()
            return put, new, state, follow_s

        put, new, state, follow_s = asyncio.run(scenario())
        r = redis.Redis.from_url(server.url)
        probe = {e[0].decode() for e in r.xrange("aof:probe")}
        alerts = {e[0].decode() for e in r.xrange(Keys("aof").alerts)}
        assert len(acked["probe"]) > 20 and len(acked["alerts"]) > 20
        assert set(acked["probe"]) <= probe and set(acked["alerts"]) <= alerts  # nothing acknowledged lost
        assert new.epoch == put.epoch and new.generation == put.generation + 1  # the document survived
        assert state == new and follow_s < 0.5, follow_s
    finally:
        stop.set()
        server.stop()
