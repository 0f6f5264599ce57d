"""Predictor versions in the MLflow model registry.

A version is a run's artifacts under "predictor/" (predictor.safetensors + predictor.json,
the folder format of adapter.training.save_predictor), registered from runs:/<run>/predictor.
Aliases are the contract: 'champion' is served, a challenger only to its canary share.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CHAMPION = "champion"
EXPERIMENT = "shadowgate-predictors"


class RegistryError(RuntimeError):
    pass


def _quiet_env() -> None:
    # the client sends usage telemetry by default; this service never does
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # the client's defaults retry a dead server for minutes (7 retries, backoff factor 2): a
    # replica must learn quickly that MLflow is down and serve on (jobs retry on their own)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class PredictorRegistry:
    def __init__(self, tracking_uri: str, name: str, cache_dir: Path | None = None):
        _quiet_env()
        from mlflow import MlflowClient

        self.uri, self.name = tracking_uri, name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.cache = Path(cache_dir or tempfile.mkdtemp(prefix="shadowgate-predictors-"))

    def resolve(self, ref: str | None) -> str | None:
        """A version number for 'champion' / an alias / a number; None when the alias is unset."""
        from mlflow.exceptions import MlflowException

        ref = ref or CHAMPION
        if str(ref).isdigit():
            return str(ref)
        try:
            return str(self.client.get_model_version_by_alias(self.name, ref).version)
        except MlflowException as exc:
            # no such model / alias: None. Anything else (server down) propagates, so a replica
            # keeps serving its last good state instead of falling back to dense.
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def exists(self, version: str) -> bool:
        """Whether the registry holds this version; RegistryError when it cannot be asked."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_model_version(self.name, str(version))
            return True
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return False
            raise RegistryError(f"the registry at {self.uri} did not answer: {exc.error_code}") from None
        except Exception as exc:  # connection refused, timeouts
            raise RegistryError(f"the registry at {self.uri} is unreachable ({type(exc).__name__})") from None

    def download(self, version: str) -> Path:
        """The predictor folder of one version (downloaded once per process)."""
        import mlflow.artifacts

        dest = self.cache / f"v{version}"
        if not (dest / "predictor.json").exists():
            dest.mkdir(parents=True, exist_ok=True)
            # by exact version, not by alias: the alias may move between resolve and download
            source = self.client.get_model_version_download_uri(self.name, version)
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest), tracking_uri=self.uri)
        if not (dest / "predictor.json").exists():
            found = list(dest.rglob("predictor.json"))
            if not found:
                raise RegistryError(f"version {version} of {self.name} holds no predictor.json")
            return found[0].parent
        return dest

    def register(self, folder: Path, tags: dict[str, str] | None = None,
                 metrics: dict[str, float] | None = None) -> str:
        """Log `folder` as a run's artifacts and register it; returns the new version. The
        folder must hold the version's drift reference (reference/features.parquet and
        reference/basis.safetensors): every version has one."""
        from mlflow.exceptions import MlflowException

        from monitor import drift

        for name in ("features.parquet", "basis.safetensors"):
            if not (Path(folder) / drift.REFERENCE_DIR / name).exists():
                raise RegistryError(f"{folder} holds no drift reference ({drift.REFERENCE_DIR}/{name} missing)")

        exp = self.client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            EXPERIMENT, artifact_location=self._local_artifacts())
        run = self.client.create_run(exp_id, tags={"shadowgate.kind": "predictor", **(tags or {})})
        run_id = run.info.run_id
        for k, v in (metrics or {}).items():
            if isinstance(v, (int, float)):
                self.client.log_metric(run_id, k, float(v))
        self.client.log_artifacts(run_id, str(folder), artifact_path="predictor")
        self.client.set_terminated(run_id)
        try:
            self.client.create_registered_model(self.name, description="shadowgate sparsity predictors")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = self.client.create_model_version(self.name, source=f"runs:/{run_id}/predictor", run_id=run_id,
                                              tags=tags)
        return str(mv.version)

    def _local_artifacts(self) -> str | None:
        """A server manages its own artifact store; a local SQLite store would otherwise put
        artifacts under ./mlruns of whatever directory the process runs in: keep them beside
        the database instead."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
        return None

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)
