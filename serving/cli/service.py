"""Service commands of the `shadowgate` CLI: the root commands `up` and `down`
(serving/cli/main.py registers them on the app)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from serving.cli.common import ConfigOpt, fail, settings_or_exit


def up(config: Optional[Path] = ConfigOpt) -> None:
    """Start the service for one machine in the foreground (Redis, MLflow, Ray, Serve app)."""
    from serving.ops import launcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings_or_exit(config)
    try:
        launcher.up(settings, say=lambda line: print(line, flush=True))
    except launcher.LaunchError as exc:
        fail(str(exc), 1)


def down(config: Optional[Path] = ConfigOpt) -> None:
    """Stop exactly what `shadowgate up` started."""
    from serving.ops import launcher

    launcher.down(settings_or_exit(config))
