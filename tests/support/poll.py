"""Waiting for a condition: the one poll loop of the tests (sync and asyncio)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float, *, interval: float = 0.2, what: str | None = None,
               detail: Callable[[], object] | None = None, proc: subprocess.Popen | None = None,
               ignore: tuple[type[BaseException], ...] = (), required: bool = True) -> T | None:
    """Call `cond` every `interval` s until it returns something truthy, and return that.

    On timeout: AssertionError naming `what` with `detail()` (a log tail, the state seen), or
    None where `required` is False (a best-effort settle). `proc`: stop early, and fail, once
    that process has exited. `ignore`: exceptions of `cond` that mean "not yet" (a server
    still starting refuses connections)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = cond()
        except ignore:
            out = None
        if out:
            return out
        exited = proc is not None and proc.poll() is not None
        if exited or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    if not required and not exited:
        return None
    why = f"the process exited ({proc.returncode})" if exited else f"not within {timeout:g} s"
    extra = f"\n{detail()}" if detail is not None else ""
    raise AssertionError(f"{what or 'condition'}: {why}{extra}")


async def until(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
                what: str | None = None) -> float:
    """The asyncio form (the event loop keeps running the code under test): waits until
    `cond()` is truthy and returns the seconds it took; AssertionError on timeout."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what or 'condition'}: not within {timeout:g} s")
        await asyncio.sleep(interval)
    return time.monotonic() - t0
