"""The `shadowgate` console script as a user runs it: a subprocess of the installed entry
point beside this interpreter, with the caller's environment on top of this process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

SHADOWGATE = Path(sys.executable).parent / "shadowgate"


def _env(env: dict | None) -> dict:
    """This process's environment, then `env` on top; a value None unsets the variable."""
    merged = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return {k: v for k, v in merged.items() if v is not None}


def shadowgate(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run it to the end; the caller checks returncode, stdout and stderr (text)."""
    return subprocess.run([str(SHADOWGATE), *args], capture_output=True, text=True, env=_env(env), timeout=timeout)


def spawn_shadowgate(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a long-running command (`up`, `monitor run`) in a session of its own, its output
    appended to `log`."""
    return subprocess.Popen([str(SHADOWGATE), *args], env=_env(env), stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def operator_cli(base: str, admin_key: str) -> Callable[..., str]:
    """`shadowgate <args> --url base` with the admin key, as an operator runs it against a
    service: returns stdout, and fails the test on a non-zero exit."""
    def run(*args: str) -> str:
        out = shadowgate(*args, "--url", base, env={"SHADOWGATE_ADMIN_KEY": admin_key}, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    return run
