"""Redis AUTH and TLS through the one client factory, against redis-servers of the tests' own
(started with requirepass / an ACL user / a TLS port), and the launcher's choice of Redis."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess

import pytest
import redis

from monitor.redis_client import describe, redis_client
from monitor.state import ControlDefaults, ControlStore, ControlUpdate
from serving.replica.control import StateFollower
from serving.ops.launcher import LaunchError, _spawn_redis, _stop_group, own_redis, redis_answers, redis_persists
from serving.settings import load_settings
from tests.support import RedisServer, free_port, until

SECRET = "s3cret-Pa55-for-tests"


def _settings(tmp_path, **redis_fields):
    return load_settings(None, state_dir=tmp_path / "state", redis=redis_fields)


@pytest.fixture
def auth_redis(tmp_path):
    """The launcher's own redis-server (AOF), with a password from settings."""
    s = _settings(tmp_path, url=f"redis://127.0.0.1:{free_port()}/0", password=SECRET)
    proc = _spawn_redis(s, "127.0.0.1", int(s.redis.url.rsplit(":", 1)[1].split("/")[0]))
    yield s
    _stop_group(proc.pid)
    proc.wait(10)


def test_auth_from_settings_and_never_in_logs_or_ps(auth_redis, caplog, tmp_path):
    s = auth_redis
    with pytest.raises(redis.AuthenticationError):  # NOAUTH without the password
        redis.Redis.from_url(s.redis.url).ping()
    client = redis_client(s.redis)
    assert client.ping() and redis_persists(s.redis) is True
    store = ControlStore(client, "auth")
    assert store.ensure(ControlDefaults()).generation == 1

    async def follow():
        seen = []

        async def apply(state):
            seen.append(state.generation)

        f = StateFollower(s.redis, "auth", "llm", ControlDefaults(), apply, 30.0)
        await f.start()
        await asyncio.to_thread(store.update, ControlUpdate(sparsity=0.3), "test")
        await until(lambda: seen[-1] == 2, 2.0, what="the follower on generation 2")
        await f.stop()
        return seen

    assert asyncio.run(follow()) == [1, 2]
    wrong = s.redis.model_copy(update={"password": s.redis.password.__class__("wrong")})
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(LaunchError, match="refused the configured credentials"):
            redis_answers(wrong)
        assert redis_answers(s.redis)
    # the secret is in no log line, no repr of the settings, no process argument list
    assert SECRET not in caplog.text and SECRET not in repr(s)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert SECRET not in ps
    conf = s.state_dir / "redis" / "redis.conf"
    assert conf.stat().st_mode & 0o077 == 0
    assert describe("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"


def test_acl_user_from_settings(tmp_path):
    s = _settings(tmp_path, url=f"redis://127.0.0.1:{free_port()}/0", username="svc", password=SECRET)
    proc = _spawn_redis(s, "127.0.0.1", int(s.redis.url.rsplit(":", 1)[1].split("/")[0]))
    try:
        assert redis_client(s.redis).acl_whoami() in ("svc", b"svc")
        with pytest.raises(redis.AuthenticationError):  # the default user is off
            redis.Redis.from_url(s.redis.url).ping()
    finally:
        _stop_group(proc.pid)
        proc.wait(10)


def _certs(folder):
    """A CA and a server certificate for 127.0.0.1 (openssl)."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
        "-out", "server.csr")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-extfile", "ext.cnf", "-out", "server.crt")
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_tls_from_settings(tmp_path):
    ca, crt, key = _certs(tmp_path)
    port = free_port()
    s = _settings(tmp_path, url=f"redis://127.0.0.1:{port}/0", tls=True, ssl_ca_certs=str(ca), password=SECRET)
    client = redis_client(s.redis)
    # TLS only: a later --port wins over the plain port RedisServer sets
    server = RedisServer(tmp_path, extra=("--port", "0", "--tls-port", str(port), "--tls-cert-file", str(crt),
                                          "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                                          "--tls-auth-clients", "no", "--requirepass", SECRET))
    with server.start(ready=client.ping):
        assert ControlStore(client, "tls").ensure(ControlDefaults()).generation == 1
        with pytest.raises(redis.ConnectionError):  # plain TCP to the TLS port is not Redis
            redis.Redis.from_url(s.redis.url, password=SECRET, socket_timeout=2).ping()
        (tmp_path / "other").mkdir()
        other_ca = _certs(tmp_path / "other")[0]
        untrusted = s.redis.model_copy(update={"ssl_ca_certs": str(other_ca)})
        with pytest.raises(redis.ConnectionError):  # a server the configured CA did not sign
            redis_client(untrusted, socket_timeout=2).ping()


def test_launcher_runs_its_own_aof_redis_beside_one_that_keeps_nothing(tmp_path):
    with RedisServer(tmp_path / "volatile", aof=False) as vol:
        s = _settings(tmp_path, url=vol.url)
        assert redis_persists(s.redis) is False
        with pytest.raises(LaunchError, match="no persistence"):
            own_redis(s.model_copy(update={"redis": s.redis.model_copy(update={"unpersisted": "refuse"})}))
        same, none, note = own_redis(s.model_copy(update={"redis": s.redis.model_copy(update={"unpersisted": "use"})}))
        assert none is None and same.redis.url == s.redis.url and "no persistence" in note
        new, proc, note = own_redis(s)
        try:
            assert new.redis.url != s.redis.url and proc is not None and redis_persists(new.redis) is True
            assert (s.state_dir / "redis" / "port").read_text() == new.redis.url.rsplit(":", 1)[1].split("/")[0]
        finally:
            _stop_group(proc.pid)
            proc.wait(10)
