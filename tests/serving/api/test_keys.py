"""API keys at rest (salted scrypt hashes), the gateway's key ring, the key CLI, and the
request bounds of the protocol that hold for every deployment. No services needed."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
from pydantic import ValidationError

from serving.api.auth import (KeyRing, add_key, check_key, client_keys, hash_key, list_keys, parse_hash, remove_key,
                          with_keys)
from serving.api.protocol import REQUEST_ID, CompletionRequest, correlation_id, new_request_id
from serving.settings import KeyPolicy, load_settings
from tests.support import shadowgate


def test_hash_is_salted_and_checks_only_the_key():
    a, b = hash_key("sg_0123abcd_" + "0" * 48), hash_key("sg_0123abcd_" + "0" * 48)
    assert a != b  # a fresh salt each time
    assert parse_hash(a)[0] == "0123abcd"
    assert check_key(("sg_0123abcd_" + "0" * 48).encode(), a)
    assert not check_key(("sg_0123abcd_" + "0" * 47 + "1").encode(), a)
    assert "0" * 48 not in a


def test_key_file_holds_hashes_only_and_the_ring_finds_each_role(tmp_path):
    path = tmp_path / "keys.json"
    alice = add_key(path, "alice", policy=KeyPolicy(rate_limit_per_min=5, max_prompts=2))
    ops = add_key(path, "ops", role="admin")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert alice not in text and ops not in text and alice.split("_")[2] not in text
    assert [k["name"] for k in list_keys(path)] == ["alice", "ops"]
    assert "hash" not in json.dumps(list_keys(path))

    ring = KeyRing(load_settings(None, key_file=path, state_dir=tmp_path, api_keys=[{"key": "plain-dev",
                                                                                     "name": "dev"}]))
    ident = ring.lookup(alice.encode())
    assert (ident.name, ident.role, ident.policy.rate_limit_per_min, ident.policy.max_prompts) == \
        ("alice", "client", 5, 2)
    assert ring.lookup(ops.encode()).role == "admin"
    assert ring.lookup(b"plain-dev").name == "dev"
    assert ring.lookup(alice[:-1].encode() + b"x") is None
    assert ring.lookup("Ã©Ã©".encode("latin-1")) is None  # any bytes: refused, never an exception
    # cached: the second lookup of a known key runs no scrypt
    t0 = time.perf_counter()
    for _ in range(100):
        assert ring.lookup(alice.encode()).name == "alice"
    assert time.perf_counter() - t0 < 0.05
    assert ring.cached(alice.encode()) == (True, ident)


def test_ring_follows_the_key_file(tmp_path):
    path = tmp_path / "keys.json"
    first = add_key(path, "first")
    ring = KeyRing(load_settings(None, key_file=path, state_dir=tmp_path), reload_s=0.0)
    assert ring.lookup(first.encode()).name == "first"
    second = add_key(path, "second")
    os.utime(path, (time.time() + 5, time.time() + 5))  # a new mtime even within the clock's tick
    assert ring.lookup(second.encode()).name == "second"
    assert remove_key(path, "first")
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert ring.lookup(first.encode()) is None
    with pytest.raises(ValueError, match="exists already"):
        add_key(path, "second")


def test_up_makes_hashed_keys_and_owner_only_plain_copies(tmp_path):
    settings = load_settings(None, state_dir=tmp_path / "state")
    new, notes = with_keys(settings)
    assert new.api_keys == [] and new.admin_key is None  # no plain key travels in the settings
    assert new.key_file == (tmp_path / "state" / "keys.json").resolve()
    api, admin = client_keys(new)
    assert api and admin and api != admin
    for kind in ("api", "admin"):
        assert stat.S_IMODE((tmp_path / "state" / f"{kind}_key").stat().st_mode) == 0o600
    assert not any(api in n or admin in n for n in notes)
    ring = KeyRing(new)
    assert ring.lookup(api.encode()).role == "client" and ring.lookup(admin.encode()).role == "admin"
    again, _ = with_keys(settings)  # a second start reads what the first made
    assert client_keys(again) == (api, admin) and len(list_keys(new.key_file)) == 2


def test_cli_prints_the_key_once_and_stores_its_hash(tmp_path):
    env = {"SHADOWGATE_STATE_DIR": str(tmp_path)}
    out = shadowgate("keys", "add", "bob", "--max-prompts", "4", env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    plain = out.stdout.strip()
    assert plain.startswith("sg_") and plain not in (tmp_path / "keys.json").read_text()
    ident = KeyRing(load_settings(None, key_file=tmp_path / "keys.json")).lookup(plain.encode())
    assert ident.name == "bob" and ident.policy.max_prompts == 4
    listed = shadowgate("keys", "list", "--json", env=env, timeout=120)
    assert plain not in listed.stdout and json.loads(listed.stdout)[0]["name"] == "bob"


def test_settings_take_a_hash_or_a_plain_key_not_both():
    h = hash_key("sg_0123abcd_" + "1" * 48)
    s = load_settings(None, api_keys=[{"key_hash": h, "name": "x", "role": "admin"}])
    assert s.api_keys[0].role == "admin" and s.api_keys[0].key is None
    with pytest.raises(ValueError, match="exactly one"):
        load_settings(None, api_keys=[{"key": "a", "key_hash": h}])


@pytest.mark.parametrize("body, message", [
    ({"prompt": "\ud800 x"}, "lone surrogate"),
    ({"prompt": ["ok", "\udfff"]}, "lone surrogate"),
    ({"prompt": "x", "stop": "\ud800"}, "lone surrogate"),
    ({"prompt": "x", "seed": 2 ** 64}, "less than or equal"),
    ({"prompt": "x", "seed": -(2 ** 63) - 1}, "greater than or equal"),
    ({"prompt": "x", "stream_options": {"bogus": 1}}, "Extra inputs"),
])
def test_protocol_refuses_what_no_replica_can_run(body, message):
    with pytest.raises(ValidationError, match=message):
        CompletionRequest.model_validate(body)


def test_request_ids_and_correlation_ids():
    rid = new_request_id()
    assert REQUEST_ID.fullmatch(rid) and REQUEST_ID.fullmatch(rid + "-3")
    assert not REQUEST_ID.fullmatch(rid + ":shadow") and not REQUEST_ID.fullmatch(rid + "\n")
    assert correlation_id("trace-42") == "trace-42"
    assert correlation_id("x" * 129) is None and correlation_id("a b") is None and correlation_id("é") is None
    assert CompletionRequest.model_validate({"prompt": ["a", "b", "c"]}).prompt_count() == 3
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompt_count() == 1


def test_guard_turns_an_unexpected_exception_into_a_json_500_naming_the_request():
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serving.api.routes import _Guard

    def boom(request):
        raise RuntimeError("detail that must not leave the server: sk-secret")

    app = Starlette(routes=[Route("/boom", boom)])
    app.add_middleware(_Guard)
    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    rid = r.headers["x-shadowgate-request-id"]
    assert REQUEST_ID.fullmatch(rid) and r.json()["error"]["request_id"] == rid and rid in r.json()["error"]["message"]
    assert "sk-secret" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
