"""Commands beside a running `shadowgate up` read the Redis it serves with: when the configured
one keeps nothing, `up` starts its own on another port, and `scenario adapt`, `bench serve`
and `jobs` must follow it (not the configured URL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from serving.ops.launcher import state_file, with_running_redis
from serving.settings import load_settings


def _settings(tmp_path):
    return load_settings(None, state_dir=str(tmp_path), redis={"url": "redis://127.0.0.1:6379/0"})


def _record(settings, pid, children, url):
    state_file(settings).write_text(json.dumps({"pid": pid, "children": children, "redis": url}))


def test_a_live_up_with_its_own_redis_is_followed(tmp_path):
    s = _settings(tmp_path)
    _record(s, os.getpid(), {"redis": 123, "mlflow": 124}, "redis://127.0.0.1:6380/0")
    assert with_running_redis(s).redis.url == "redis://127.0.0.1:6380/0"
    assert with_running_redis(s).redis.prefix == s.redis.prefix


def test_the_configured_redis_is_kept_otherwise(tmp_path):
    s = _settings(tmp_path)
    assert with_running_redis(s).redis.url == s.redis.url  # no `up` ever ran
    _record(s, os.getpid(), {"mlflow": 124}, "redis://127.0.0.1:6379/0")  # up used the configured one
    assert with_running_redis(s).redis.url == s.redis.url
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _record(s, dead.pid, {"redis": 123}, "redis://127.0.0.1:6380/0")  # that up is gone
    assert with_running_redis(s).redis.url == s.redis.url
    state_file(s).write_text("{not json")
    assert with_running_redis(s).redis.url == s.redis.url
