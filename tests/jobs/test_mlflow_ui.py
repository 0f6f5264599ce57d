"""The approval a person makes in the real MLflow UI (headless Chromium, Playwright), on a
real MLflow server: the alias lands on the version, moves when set on another, and a page
of a version that does not exist is a clear error."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from jobs.mlflow_ui import UIError, chromium_path, set_alias_in_ui

pytestmark = pytest.mark.service


def test_alias_set_in_the_ui_lands_and_moves(mlflow_uri):
    assert chromium_path(), "Chromium is missing: `make test` installs the Debian package `chromium`"
    c = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    c.create_registered_model("ui-model")
    eid = c.create_experiment("ui")
    versions = []
    for _ in range(2):
        run = c.create_run(eid).info.run_id
        folder = Path(tempfile.mkdtemp())
        (folder / "predictor.json").write_text("{}")
        c.log_artifacts(run, str(folder), "predictor")
        versions.append(c.create_model_version("ui-model", f"runs:/{run}/predictor", run_id=run).version)
    set_alias_in_ui(mlflow_uri, "ui-model", versions[0])
    assert c.get_model_version_by_alias("ui-model", "approved").version == versions[0]
    set_alias_in_ui(mlflow_uri, "ui-model", versions[1])  # offered twice (held by v1): moves
    assert c.get_model_version_by_alias("ui-model", "approved").version == versions[1]
    with pytest.raises(UIError, match="no aliases control"):
        set_alias_in_ui(mlflow_uri, "ui-model", "99", timeout_s=15)
