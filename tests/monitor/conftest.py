"""Fixtures of the monitor tests: a real local HTTP receiver standing in for a webhook
endpoint (the redis-server, `redis_url`, is tests/conftest.py's)."""

from __future__ import annotations

import pytest

from tests.support import Receiver


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r
