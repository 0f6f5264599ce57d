"""Predictor versions in the MLflow model registry.

A version is a run's artifacts under "predictor/" (predictor.safetensors + predictor.json,
the folder format of adapter.selection.artifact.save_predictor), registered from runs:/<run>/predictor.
Aliases are the contract: 'champion' is served, a challenger only to its canary share.

Every registry of the service is made by `registry_for(settings)`: the URI, the model name
and the basic-auth credentials (`mlflow.username` / `mlflow.password`, handed to the client
the way it reads them, MLFLOW_TRACKING_USERNAME / _PASSWORD, never logged) all come from the
settings' `mlflow` section. A registry made with a `Retry` (the jobs') retries a call that
fails because the server is down or answers 5xx, with exponential backoff, then raises
RegistryError; a registry without one (the replicas') fails at once, so a replica serves on
what it holds. A server that refuses the credentials (401, 403) raises RegistryAuthError at
once, worded with the URI and the user name.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHAMPION = "champion"
EXPERIMENT = "shadowgate-predictors"


class RegistryError(RuntimeError):
    pass


class RegistryUnavailable(RegistryError):
    """The server did not answer (down, unreachable, 5xx), after the retries if any."""


class BadArtifact(RegistryError):
    """A version's artifacts are not a predictor folder."""


class RegistryAuthError(RegistryError):
    """The server refused this process's credentials (none, wrong ones, or too few rights)."""


# answers that say something about the request, not about the server: never retried
_REQUEST_ERRORS = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS",
                   "PERMISSION_DENIED", "UNAUTHENTICATED", "BAD_REQUEST", "INVALID_STATE", "NOT_FOUND"}


@dataclass(frozen=True)
class Retry:
    """Bounded exponential backoff: waits base_s, 2 base_s, ... (at most max_s each), `attempts`
    tries in all."""

    attempts: int = 5
    base_s: float = 1.0
    max_s: float = 16.0

    def delays(self):
        return [min(self.base_s * 2 ** i, self.max_s) for i in range(self.attempts - 1)]


def transient(exc: Exception) -> bool:
    """The server is down, unreachable or failing (5xx): worth trying again."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in _REQUEST_ERRORS
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


def refusal(exc: Exception, uri: str, username: str | None) -> RegistryAuthError | None:
    """A 401 / 403 from the server, worded for the operator (the user name, never the password)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException) or exc.error_code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return None
    if exc.error_code == "PERMISSION_DENIED":
        return RegistryAuthError(f"the MLflow server at {uri} denied user {username!r} this registry call "
                                 "(403 permission denied): grant the user EDIT on the registered model")
    if not username:
        return RegistryAuthError(f"the MLflow server at {uri} requires credentials (401 unauthenticated): "
                                 "set mlflow.username and mlflow.password")
    return RegistryAuthError(f"the MLflow server at {uri} refused the credentials of user {username!r} "
                             "(401 unauthenticated): check mlflow.username and mlflow.password")


class _Client:
    """An MlflowClient whose refusals (401, 403) raise RegistryAuthError and, under a `retry`,
    whose transient failures are retried; without one, anything else propagates as it is."""

    def __init__(self, client, retry: Retry | None, uri: str, username: str | None):
        self._client, self._retry, self._uri, self._username = client, retry, uri, username

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            for delay in [*(self._retry.delays() if self._retry else []), None]:
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:
                    refused = refusal(exc, self._uri, self._username)
                    if refused is not None:
                        raise refused from None
                    if not transient(exc) or self._retry is None:
                        raise
                    if delay is None:
                        raise RegistryUnavailable(f"the registry at {self._uri} is unreachable: {name} failed "
                                            f"{self._retry.attempts} times over {sum(self._retry.delays()):.0f} s "
                                            f"({type(exc).__name__})") from None
                    log.warning("MLflow at %s: %s failed (%s); retrying in %.1f s", self._uri, name,
                                type(exc).__name__, delay)
                    time.sleep(delay)

        return call


def use_credentials(username: str | None, password) -> None:
    """Basic auth for this process's MLflow client (it reads these variables per request)."""
    if username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = username
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = (password.get_secret_value()
                                                  if hasattr(password, "get_secret_value") else str(password))


def _quiet_env() -> None:
    # the client sends usage telemetry by default; this service never does
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # the client's defaults retry a dead server for minutes (7 retries, backoff factor 2): a
    # replica must learn quickly that MLflow is down and serve on (jobs retry on their own)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def check_reference(folder: Path) -> None:
    from monitor import drift

    for name in ("features.parquet", "basis.safetensors"):
        if not (Path(folder) / drift.REFERENCE_DIR / name).exists():
            raise RegistryError(f"{folder} holds no drift reference ({drift.REFERENCE_DIR}/{name} missing)")


def registry_for(settings, retry: Retry | None = None, cache_dir: Path | None = None) -> "PredictorRegistry":
    """The service's registry: URI, registered model and basic-auth credentials from
    `settings.mlflow` (the credentials are set for this process: the gateway, every replica
    and job process calls this, so each sends them)."""
    m = settings.mlflow
    use_credentials(m.username, m.password)
    return PredictorRegistry(m.tracking_uri, m.registered_model, cache_dir=cache_dir, retry=retry,
                             username=m.username)


_job_cache: Path | None = None


def job_registry(settings) -> "PredictorRegistry":
    """The jobs' registry: calls retried under `jobs.registry_*`, downloads kept once per
    process (a job runs every few seconds)."""
    global _job_cache
    if _job_cache is None:
        _job_cache = Path(tempfile.mkdtemp(prefix="shadowgate-jobs-predictors-"))
    j = settings.jobs
    return registry_for(settings, Retry(j.registry_attempts, j.registry_backoff_s, j.registry_backoff_max_s),
                        cache_dir=_job_cache)


class PredictorRegistry:
    """Use `registry_for(settings)`; this constructor sends whatever credentials the process
    holds (tests and tools that point at a store of their own)."""

    def __init__(self, tracking_uri: str, name: str, cache_dir: Path | None = None, retry: Retry | None = None,
                 username: str | None = None):
        _quiet_env()
        from mlflow import MlflowClient

        self.uri, self.name = tracking_uri, name
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.client = _Client(client, retry, tracking_uri, username or os.environ.get("MLFLOW_TRACKING_USERNAME"))
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
        except RegistryError:  # already worded (the retries are spent)
            raise
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return False
            raise RegistryUnavailable(f"the registry at {self.uri} did not answer: {exc.error_code}") from None
        except Exception as exc:  # connection refused, timeouts
            raise RegistryUnavailable(f"the registry at {self.uri} is unreachable ({type(exc).__name__})") from None

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
                raise BadArtifact(f"version {version} of {self.name} holds no predictor.json")
            return found[0].parent
        return dest

    def register(self, folder: Path, tags: dict[str, str] | None = None,
                 metrics: dict[str, float] | None = None) -> str:
        """Log `folder` as a run's artifacts and register it; returns the new version. The
        folder must hold the version's drift reference (reference/features.parquet and
        reference/basis.safetensors): every version has one."""
        check_reference(folder)
        run_id = self.start_run(EXPERIMENT, tags={"shadowgate.kind": "predictor", **(tags or {})})
        for k, v in (metrics or {}).items():
            if isinstance(v, (int, float)):
                self.client.log_metric(run_id, k, float(v))
        self.client.log_artifacts(run_id, str(folder), artifact_path="predictor")
        self.client.set_terminated(run_id)
        return self.register_run(run_id, tags)

    def start_run(self, experiment: str, tags: dict[str, str] | None = None) -> str:
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=self._local_artifacts())
        return self.client.create_run(exp_id, tags=tags or {}).info.run_id

    def register_run(self, run_id: str, tags: dict[str, str] | None = None) -> str:
        """Register runs:/<run_id>/predictor (already logged, with its reference) as a new version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(self.name, description="shadowgate sparsity predictors")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = self.client.create_model_version(self.name, source=f"runs:/{run_id}/predictor", run_id=run_id,
                                              tags=tags)
        return str(mv.version)

    def versions(self, tag: str | None = None, value: str | None = None) -> list:
        """Model versions (MLflow ModelVersion objects), newest first; optionally those whose
        tag `tag` equals `value`."""
        flt = f"name = '{self.name}'"
        if tag is not None:
            flt += f" and tags.`{tag}` = '{value}'"
        found = self.client.search_model_versions(flt, max_results=1000)
        return sorted(found, key=lambda mv: int(mv.version), reverse=True)

    def version(self, version: str):
        return self.client.get_model_version(self.name, str(version))

    def aliases(self) -> dict[str, str]:
        """alias -> version (search_model_versions does not return aliases)."""
        from mlflow.exceptions import MlflowException

        try:
            return {a: str(v) for a, v in self.client.get_registered_model(self.name).aliases.items()}
        except RegistryError:
            raise
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise RegistryUnavailable(f"the registry at {self.uri} did not answer: {exc.error_code}") from None
        except Exception as exc:  # connection refused, timeouts
            raise RegistryUnavailable(f"the registry at {self.uri} is unreachable ({type(exc).__name__})") from None

    def set_tag(self, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.name, str(version), key, value)

    def delete_alias(self, alias: str) -> None:
        self.client.delete_registered_model_alias(self.name, alias)

    def _local_artifacts(self) -> str | None:
        """A server manages its own artifact store; a local SQLite store would otherwise put
        artifacts under ./mlruns of whatever directory the process runs in: keep them beside
        the database instead."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
        return None

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)
