"""The one typed configuration of shadowgate: a YAML file plus SHADOWGATE_* environment
overrides (nested fields with "__", e.g. SHADOWGATE_RUNTIME__DTYPE=bfloat16), validated
once at the entry point and passed down as typed sub-configs.

Precedence (highest first): explicit overrides from the CLI, environment, YAML file,
defaults. The YAML file is the one named by --config, else SHADOWGATE_CONFIG, else none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from adapter.config import RuntimeConfig
from jobs.config import AdaptSettings, CanarySettings, JobsSettings
from monitor.alerts import AlertSettings
from monitor.config import MonitorSettings
from monitor.state import ControlDefaults


class ConfigError(ValueError):
    """A configuration problem, worded for the operator."""


class ModelSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = "default"  # default | default-llama | default-opt | local path | hub id


class KeyPolicy(BaseModel):
    """What one API key (a tenant or use case) may do. A domain that tolerates no
    approximation gets max_sparsity 0; shadow samples hold prompt tokens, hence the opt-out
    and the retention time of its stored samples."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    min_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    max_sparsity: float = Field(0.9, ge=0.0, lt=1.0)
    shadow: bool = True
    shadow_retention_s: int = Field(7 * 86400, ge=1)
    rate_limit_per_min: int | None = Field(None, ge=1, description="prompts per minute (a request of n "
                                           "prompts counts n); None: unlimited")
    tokens_per_min: int | None = Field(None, ge=1, description="prompt tokens + max_tokens per prompt, per "
                                       "minute; None: unlimited")
    max_prompts: int | None = Field(None, ge=1, description="prompts per request; None: the gateway's bound")
    max_request_tokens: int | None = Field(None, ge=1, description="prompt tokens + max_tokens per prompt, "
                                           "summed over one request; None: the gateway's bound")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_sparsity > self.max_sparsity:
            raise ValueError(f"min_sparsity {self.min_sparsity} exceeds max_sparsity {self.max_sparsity}")
        return self


class ApiKey(BaseModel):
    """One key: its salted hash (`key_hash`, as `shadowgate keys add` writes it) or, for
    development and tests only, the plain `key`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: SecretStr | None = None
    key_hash: str | None = None  # "scrypt$<id>$<n>$<r>$<p>$<salt hex>$<hash hex>" (serving/api/auth.py)
    name: str | None = None  # shown in audit records and metrics instead of the secret
    role: Literal["client", "admin"] = "client"  # admin: the /admin API and every state change
    policy: KeyPolicy | None = None  # None: the default policy

    @model_validator(mode="after")
    def _one_secret(self):
        if (self.key is None) == (self.key_hash is None):
            raise ValueError("an API key needs exactly one of key (plain) or key_hash")
        return self


class GatewaySettings(BaseModel):
    """Bounds on one request, checked before any work is queued, what is open without a key,
    and the retry of work whose GatedLLM replica died."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="bytes of one request body")
    max_prompts_per_request: int = Field(64, ge=1)
    max_prompt_bytes: int = Field(16_384, ge=1, description="UTF-8 bytes of one text prompt, checked "
                                  "before it is tokenized")
    max_request_tokens: int = Field(16_384, ge=1, description="prompt tokens + max_tokens per prompt, "
                                    "summed over one request")
    retries: int = Field(3, ge=0, description="attempts after the first when a replica dies before "
                         "anything was streamed")
    retry_backoff_s: float = Field(0.5, ge=0, description="first backoff; doubled per attempt, at most 4 s")
    metrics_public: bool = False  # /metrics without a key; default: the admin key
    openapi_public: bool = False  # /openapi.json without a key; default: any valid key


class RedisSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    url: str = "redis://127.0.0.1:6379/0"
    start_local: bool = True  # `shadowgate up` starts a redis-server when none answers at url
    prefix: str = "shadowgate"  # every key and stream lives under this prefix
    # AUTH (requirepass or an ACL user) and TLS; every client is made by monitor/redis_client.py
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False  # rediss://; the CA and an optional client certificate below
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # `shadowgate up` when the Redis answering at url keeps nothing (no AOF, no RDB saves): a
    # control state, samples and alerts there die with the process. "own": start a
    # redis-server with AOF under state_dir on the next free port; "use": use it anyway;
    # "refuse": stop with an error.
    unpersisted: Literal["own", "use", "refuse"] = "own"


class MlflowSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    tracking_uri: str = "http://127.0.0.1:5000"
    start_local: bool = True  # `shadowgate up` starts a lean server when none answers
    registered_model: str = "shadowgate-predictor"
    # basic auth of a server run with `--app-name basic-auth` (sent by the MLflow client as
    # MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)
    username: str | None = None
    password: SecretStr | None = None
    ui_url: str | None = None  # where people open the MLflow UI (links in alerts); None: tracking_uri
    bootstrap_per_family: int = Field(60, ge=1, description="suite instances per family when the "
                                      "first predictor must be trained (nothing shipped)")
    bootstrap_epochs: int = Field(30, ge=1)
    reference_per_family: int = Field(200, ge=1, description="suite prompts per family in a version's drift "
                                      "reference (six families: 1,200 rows by default)")


class RaySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    address: str | None = None  # None: `shadowgate up` starts a local head
    num_cpus: float = Field(2, gt=0)
    dashboard: bool = False
    object_store_mb: int = Field(200, ge=75)


class ServeSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    llm_replicas: int = Field(1, ge=1)
    shadow_replicas: int = Field(1, ge=1)
    replica_cpus: float = Field(0.25, ge=0.0)
    max_ongoing_requests: int = Field(32, ge=1)
    shadow_max_inflight: int = Field(4, ge=1, description="shadow runs in flight per gateway; beyond "
                                      "this a sampled request is dropped and counted")
    shadow_stream_maxlen: int = Field(10_000, ge=10)
    audit_retention_s: int = Field(7 * 86400, ge=1)
    reconcile_s: float = Field(5.0, gt=0, description="period of the control-state reconcile poll")
    max_tokens_limit: int = Field(256, ge=1)
    # how often Serve's controller checks each GatedLLM / ShadowDense replica: a SIGKILLed
    # replica is noticed (and its replacement started) at the next check, not before
    health_check_period_s: float = Field(2.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    route_prefix: str = "/"
    defaults: ControlDefaults = ControlDefaults()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHADOWGATE_", env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    model: ModelSettings = ModelSettings()
    runtime: RuntimeConfig = RuntimeConfig()

    # the HTTP API
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # SHADOWGATE_API_KEYS="k1,k2" (plain keys, default policy) or, in YAML, a list of
    # {key, name, policy} entries
    api_keys: Annotated[list[ApiKey], NoDecode] = []
    admin_key: SecretStr | None = None
    # a key file of salted hashes (`shadowgate keys add`), re-read when it changes; `shadowgate
    # up` makes one under state_dir when no key is configured
    key_file: Path | None = None
    default_policy: KeyPolicy = KeyPolicy()
    gateway: GatewaySettings = GatewaySettings()
    state_dir: Path = Path.home() / ".shadowgate"  # generated keys, launcher state, local services' data

    redis: RedisSettings = RedisSettings()
    mlflow: MlflowSettings = MlflowSettings()
    ray: RaySettings = RaySettings()
    serve: ServeSettings = ServeSettings()
    monitor: MonitorSettings = MonitorSettings()
    alerts: AlertSettings = AlertSettings()
    jobs: JobsSettings = JobsSettings()
    adapt: AdaptSettings = AdaptSettings()
    canary: CanarySettings = CanarySettings()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return [{"key": v} if isinstance(v, str) else v for v in value]

    def policy_for(self, entry: ApiKey) -> KeyPolicy:
        return entry.policy or self.default_policy

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    path: Path | None = None

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by pydantic here
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        return _read_yaml(self.path)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_settings(config_path: str | os.PathLike | None = None, **overrides: Any) -> Settings:
    """Load and validate settings; raise ConfigError with a readable message on bad input."""
    path = config_path or os.environ.get("SHADOWGATE_CONFIG")
    _YamlSource.path = Path(path) if path else None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
    finally:
        _YamlSource.path = None
