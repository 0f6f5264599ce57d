"""The per-key rate limit over a sliding 60 s window (serving/api/auth.py RateLimiter), against
a real redis-server: limited the same wherever the minute boundary falls, freed as the window
slides, one budget for every gateway replica, nothing taken by a refused request, and the
same sliding window per replica while Redis is unreachable. Time comes from an injected
clock, never from sleeps."""

from __future__ import annotations

import asyncio
import logging

import pytest

from monitor.keys import Keys
from monitor.redis_client import async_redis_client
from serving.api.auth import Identity, RateLimiter
from serving.api.metrics import Metrics
from serving.api.protocol import ApiError
from serving.settings import KeyPolicy
from serving.ops.stack import free_port

MINUTE = 60 * 29_000_000  # a minute boundary (any will do)


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def key(name: str, prompts: int | None = None, tokens: int | None = None) -> Identity:
    return Identity(name, "client", KeyPolicy(rate_limit_per_min=prompts, tokens_per_min=tokens))


async def take(limiter: RateLimiter, ident: Identity, prompts: int = 1, tokens: int = 1) -> int:
    """200, or the status of the refusal."""
    try:
        await limiter.check(ident, prompts, tokens)
        return 200
    except ApiError as exc:
        return exc.status


def run(coro):
    return asyncio.run(coro)


def test_a_minute_boundary_changes_nothing(redis_url):
    """The same schedule (3 prompts per minute; requests at these offsets, seconds) is
    limited the same whether it lies within one minute or across a boundary; a fixed
    per-minute window would let the requests after the boundary through."""
    schedule = [0, 5, 10, 15, 20, 30, 45, 59.9, 60, 65, 75, 90]

    async def outcomes(start: float, name: str) -> list[int]:
        clock = Clock()
        limiter = RateLimiter(async_redis_client(redis_url), "rl1", clock=clock)
        got = []
        for offset in schedule:
            clock.t = start + offset
            got.append(await take(limiter, key(name, prompts=3)))
        await limiter.r.aclose()
        return got

    within = run(outcomes(MINUTE + 0.0, "within"))
    for i, start in enumerate((MINUTE - 10.0, MINUTE - 30.0, MINUTE - 59.75)):
        assert run(outcomes(start, f"across-{i}")) == within
    # the first three, then nothing until the first of them is 60 s old (at 60), and so on
    assert within == [200, 200, 200, 429, 429, 429, 429, 429, 200, 200, 200, 429]


def test_the_limit_frees_up_as_the_window_slides(redis_url):
    async def main():
        clock = Clock(MINUTE - 20.0)
        limiter = RateLimiter(async_redis_client(redis_url), "rl2", clock=clock)
        ident = key("slide", prompts=5)
        assert await take(limiter, ident, prompts=2) == 200  # at -20
        clock.t = MINUTE - 1.0
        assert await take(limiter, ident, prompts=3) == 200  # at -1: 5 in the window
        clock.t = MINUTE + 1.0  # a new fixed minute: still 5 in the last 60 s
        with pytest.raises(ApiError) as refused:
            await limiter.check(ident, 1, 1)
        assert refused.value.status == 429 and refused.value.kind == "rate_limit_error"
        assert refused.value.message == "rate limit of 5 prompts per minute exceeded (1 in this request)"
        clock.t = MINUTE + 39.999  # the 2 taken at -20 are 59.999 s old
        assert await take(limiter, ident) == 429
        clock.t = MINUTE + 40.0  # ... and 60 s old now: 2 free, no more
        assert await take(limiter, ident, prompts=3) == 429
        assert await take(limiter, ident, prompts=2) == 200
        clock.t = MINUTE + 59.0  # the 3 taken at -1 left at 59
        assert await take(limiter, ident, prompts=3) == 200
        assert await take(limiter, ident) == 429
        await limiter.r.aclose()

    run(main())


def test_two_gateways_share_one_budget(redis_url):
    """Two limiters, each with its own connection (as two gateway replicas hold): one budget,
    also under concurrent requests (the script takes atomically)."""

    async def main():
        clock = Clock(MINUTE + 10.0)
        a = RateLimiter(async_redis_client(redis_url), "rl3", clock=clock)
        b = RateLimiter(async_redis_client(redis_url), "rl3", clock=clock)
        ident = key("shared", prompts=4)
        assert [await take(g, ident) for g in (a, b, a, b, a, b)] == [200, 200, 200, 200, 429, 429]
        clock.t += 60
        burst = await asyncio.gather(*(take(g, key("shared", prompts=4)) for g in [a, b] * 10))
        assert sorted(burst) == [200] * 4 + [429] * 16
        other = key("other", prompts=4)  # budgets are per key
        assert await take(b, other) == 200
        await a.r.aclose()
        await b.r.aclose()

    run(main())


def test_a_refused_request_takes_nothing_and_both_limits_hold(redis_url):
    async def main():
        clock = Clock(MINUTE)
        metrics = Metrics()
        limiter = RateLimiter(async_redis_client(redis_url), "rl4", metrics, clock=clock)
        ident = key("both", prompts=5, tokens=100)
        assert await take(limiter, ident, prompts=3, tokens=90) == 200
        with pytest.raises(ApiError) as refused:  # prompts would fit, tokens not
            await limiter.check(ident, 1, 20)
        assert refused.value.message == "rate limit of 100 tokens per minute exceeded (20 in this request)"
        assert await take(limiter, ident, prompts=2, tokens=10) == 200  # 3 + 2 prompts, 90 + 10 tokens
        with pytest.raises(ApiError) as refused:
            await limiter.check(ident, 1, 0)
        assert refused.value.message == "rate limit of 5 prompts per minute exceeded (1 in this request)"
        assert metrics.registry.get_sample_value("shadowgate_refused_total", {"reason": "rate_limit"}) == 2
        # a running total lost (evicted) is counted again from the log
        await limiter.r.delete(Keys("rl4").rate_total("tokens", "both"))
        assert await take(limiter, ident, prompts=0, tokens=1) == 429
        clock.t += 60
        assert await take(limiter, ident, prompts=5, tokens=100) == 200
        await limiter.r.aclose()

    run(main())


def test_unlimited_keys_and_the_servers_clock(redis_url):
    async def main():
        r = async_redis_client(redis_url)
        limiter = RateLimiter(r, "rl5")  # no clock: Redis's TIME, one clock for all replicas
        assert [await take(limiter, key("server-clock", prompts=2)) for _ in range(3)] == [200, 200, 429]
        for _ in range(50):
            assert await take(limiter, key("free")) == 200
        assert not [k async for k in r.scan_iter("rl5:rate:*free")]  # an unlimited key touches no Redis
        await r.aclose()

    run(main())


def test_while_redis_is_unreachable_each_replica_slides_alone(caplog):
    async def main():
        clock = Clock(MINUTE - 30.0)
        down = async_redis_client(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
        limiter = RateLimiter(down, "rl6", clock=clock)
        ident = key("offline", prompts=3)
        with caplog.at_level(logging.WARNING, logger="serving.api.auth"):
            got = []
            for t in (-30, -10, -1, 1, 29.999, 30, 31):
                clock.t = MINUTE + t
                got.append(await take(limiter, ident))
        assert got == [200, 200, 200, 429, 429, 200, 429]
        assert sum("rate limits are counted per gateway replica" in r.message for r in caplog.records) == 1
        with pytest.raises(ApiError, match=r"rate limit of 3 prompts per minute exceeded \(1 in this request\)"):
            await limiter.check(ident, 1, 1)
        await down.aclose()

    run(main())
