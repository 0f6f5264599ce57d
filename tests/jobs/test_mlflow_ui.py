"""The approval a person makes in the real MLflow UI (headless Chromium, Playwright), on a
real MLflow server (the `mlflow_uri` fixture: `mlflow server --workers 1` on a free port):
the alias lands on the version, moves when set on another, setting it again is a no-op, and
the page of a version that does not exist is a clear error well within the timeout."""

from __future__ import annotations

import time

import pytest
from mlflow import MlflowClient

from jobs.mlflow_ui import UIError, chromium_path, set_alias_in_ui

pytestmark = pytest.mark.service

NAME = "ui-model"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.fail("Chromium is missing: `make test` installs the Debian package `chromium` (`make browser`)")
    return path


@pytest.fixture(scope="module")
def client(mlflow_uri, tmp_path_factory) -> MlflowClient:
    """A registered model with two versions, each a run's `predictor/` artifacts."""
    c = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    c.create_registered_model(NAME)
    eid = c.create_experiment("ui")
    folder = tmp_path_factory.mktemp("predictor")
    (folder / "predictor.json").write_text("{}")
    for expected in ("1", "2"):
        run_id = c.create_run(eid).info.run_id
        c.log_artifacts(run_id, str(folder), "predictor")
        assert c.create_model_version(NAME, f"runs:/{run_id}/predictor", run_id=run_id).version == expected
    return c


def holder(c: MlflowClient, alias: str) -> str | None:
    """The version that holds `alias`, read back through the API (None: no version does)."""
    return c.get_registered_model(NAME).aliases.get(alias)


# Each test uses an alias of its own that only the browser ever sets: what the API reads back
# can only have come from the UI.

def test_alias_set_in_the_ui_lands_on_the_version(mlflow_uri, client, chromium):
    assert holder(client, "approved") is None
    took = set_alias_in_ui(mlflow_uri, NAME, "1", chromium=chromium)
    assert client.get_model_version_by_alias(NAME, "approved").version == "1"
    assert 0 < took < 60


def test_alias_set_on_another_version_moves(mlflow_uri, client, chromium):
    set_alias_in_ui(mlflow_uri, NAME, "1", alias="moved", chromium=chromium)
    assert holder(client, "moved") == "1"
    # held by v1, the alias is offered twice in v2's dialog: the first option moves it
    set_alias_in_ui(mlflow_uri, NAME, "2", alias="moved", chromium=chromium)
    assert client.get_model_version_by_alias(NAME, "moved").version == "2"
    assert client.get_registered_model(NAME).aliases["moved"] == "2"  # one holder: v1 lost it


def test_alias_already_on_the_version_is_left_as_it_is(mlflow_uri, client, chromium):
    set_alias_in_ui(mlflow_uri, NAME, "2", alias="kept", chromium=chromium)
    assert holder(client, "kept") == "2"
    set_alias_in_ui(mlflow_uri, NAME, "2", alias="kept", chromium=chromium)  # Enter on its chip would remove it
    assert client.get_model_version_by_alias(NAME, "kept").version == "2"


def test_a_version_that_does_not_exist_is_a_clear_error(mlflow_uri, client, chromium, tmp_path):
    shot = tmp_path / "missing.png"
    t0 = time.monotonic()
    with pytest.raises(UIError, match=rf"no aliases control on the page of {NAME} version 99 .*does not exist"):
        set_alias_in_ui(mlflow_uri, NAME, "99", chromium=chromium, timeout_s=20, screenshot=shot)
    assert time.monotonic() - t0 < 25
    assert shot.stat().st_size > 0
