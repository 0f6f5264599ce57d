"""The one typed configuration of shadowgate: a YAML file plus SHADOWGATE_* environment
overrides (nested fields with "__", e.g. SHADOWGATE_RUNTIME__DTYPE=bfloat16), validated
once at the entry point and passed down as typed sub-configs.

Precedence (highest first): explicit overrides from the CLI, environment, YAML file,
defaults. The YAML file is the one named by --config, else SHADOWGATE_CONFIG, else none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from adapter.config import RuntimeConfig


class ConfigError(ValueError):
    """A configuration problem, worded for the operator."""


class ModelSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = "default"  # default | default-llama | default-opt | local path | hub id


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHADOWGATE_", env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    model: ModelSettings = ModelSettings()
    runtime: RuntimeConfig = RuntimeConfig()

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
