"""Daemon settings: defaults < YAML file < ``AIBRIDGED_*`` environment < command-line flags.

Pure data: nothing here opens sockets or reads secrets' contents into logs. Lists (providers,
API keys, MCP servers) come from the YAML file, or from the environment as JSON
(``AIBRIDGED_PROVIDERS='[{"name": "anthropic", ...}]'``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_BASE_URLS = {
    "anthropic": "https://api.anthropic.com",
    "openai": "https://api.openai.com/v1",
}
DEFAULT_KEY_ENVS = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}
PROVIDER_NAME_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"


class ProviderConfig(BaseModel):
    """An upstream provider: its route prefix (``name``), API type, base URL and central key."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=PROVIDER_NAME_PATTERN)
    type: Literal["anthropic", "openai"]
    base_url: str = ""
    api_key: str | None = Field(default=None, repr=False)
    api_key_env: str | None = None
    send_actor_headers: bool = False
    # Retries before the first byte reaches the client (connection errors, 429, 5xx, 529).
    max_retries: int = Field(default=0, ge=0, le=10)

    @model_validator(mode="after")
    def _defaults(self) -> ProviderConfig:
        if not self.base_url:
            self.base_url = DEFAULT_BASE_URLS[self.type]
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"provider {self.name!r}: base_url must be an http(s) URL")
        return self


class ApiKeyConfig(BaseModel):
    """A gateway client key (plain, or its sha256) and the actor it authenticates."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(default=None, repr=False)
    key_sha256: str | None = None
    key_id: str = ""
    actor_id: str
    username: str = ""
    metadata: dict[str, str] = Field(default_factory=dict)
    expires_at: float | None = None

    @model_validator(mode="after")
    def _one_key(self) -> ApiKeyConfig:
        if bool(self.key) == bool(self.key_sha256):
            raise ValueError(
                f"api key of actor {self.actor_id!r}: set exactly one of key, key_sha256"
            )
        if self.key_sha256 is not None:
            self.key_sha256 = self.key_sha256.lower()
            if len(self.key_sha256) != 64 or any(
                c not in "0123456789abcdef" for c in self.key_sha256
            ):
                raise ValueError(
                    f"api key of actor {self.actor_id!r}: key_sha256 is not a sha256 hex"
                )
        return self


class McpServerConfig(BaseModel):
    """A central MCP server whose tools are injected (used from the MCP milestone on)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    url: str
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    tool_allow_regex: str = ""
    tool_deny_regex: str = ""


def _default_providers() -> list[ProviderConfig]:
    return [ProviderConfig(name="anthropic", type="anthropic", api_key_env="ANTHROPIC_API_KEY")]


class Settings(BaseSettings):
    """Every setting of ``aibridged serve``; each is also a flag and an ``AIBRIDGED_*`` variable."""

    model_config = SettingsConfigDict(env_prefix="AIBRIDGED_", extra="forbid")

    listen: str = "127.0.0.1:8080"
    control_listen: str = "127.0.0.1:8081"
    metrics_listen: str = "127.0.0.1:2112"
    spool_path: Path = Path("aibridged.db")
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    ping_interval: float = Field(default=10.0, gt=0)
    shutdown_grace: float = Field(default=30.0, ge=0)
    upstream_connect_timeout: float = Field(default=10.0, gt=0)
    upstream_idle_timeout: float = Field(default=600.0, gt=0)
    on_client_disconnect: Literal["drain", "cancel"] = "drain"
    disconnect_drain_timeout: float = Field(default=120.0, ge=0)
    allow_byok: bool = True
    require_control: bool = False
    control_token: str | None = Field(default=None, repr=False)
    control_token_file: Path | None = None
    control_tls_cert_file: Path | None = None
    control_tls_key_file: Path | None = None
    control_tls_client_ca_file: Path | None = None
    control_grace: float = Field(default=5.0, ge=0)
    spool_max_records: int = Field(default=5_000_000, gt=0)
    spool_max_age: float = Field(default=7 * 86400.0, gt=0)
    spool_flush_timeout: float = Field(default=5.0, gt=0)
    metrics_enabled: bool = True
    mcp_call_timeout: float = Field(default=60.0, gt=0)
    mcp_list_timeout: float = Field(default=5.0, gt=0)
    mcp_list_ttl: float = Field(default=300.0, gt=0)
    mcp_max_iterations: int = Field(default=10, ge=1, le=100)
    small_model_pattern: str = "haiku"
    byok_header: str = "x-aibridged-provider-key"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    providers: list[ProviderConfig] = Field(default_factory=_default_providers)
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    mcp_servers: list[McpServerConfig] = Field(default_factory=list)

    @field_validator("listen", "control_listen", "metrics_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value.startswith("unix:"):
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{value!r} is not HOST:PORT")
        return value

    @model_validator(mode="after")
    def _control_consistency(self) -> Settings:
        if self.require_control and not self.control_token and not self.control_token_file:
            raise ValueError("require_control needs control_token or control_token_file")
        if bool(self.control_tls_cert_file) != bool(self.control_tls_key_file):
            raise ValueError("control_tls_cert_file and control_tls_key_file go together")
        if self.control_tls_client_ca_file and not self.control_tls_cert_file:
            raise ValueError("control_tls_client_ca_file (mTLS) needs control_tls_cert_file")
        return self

    def control_bearer(self) -> str | None:
        """The control-plane token, from the setting or its file (stripped); None if unset."""
        if self.control_token:
            return self.control_token
        if self.control_token_file is not None:
            token = self.control_token_file.read_text().strip()
            if not token:
                raise ConfigError(f"control token file is empty: {self.control_token_file}")
            return token
        return None

    @field_validator("small_model_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regex: {exc}") from None
        return value

    @field_validator("providers")
    @classmethod
    def _unique_names(cls, value: list[ProviderConfig]) -> list[ProviderConfig]:
        names = [p.name for p in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate provider name(s): {', '.join(dupes)}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = _CONFIG_FILE.get("path")
        if config_file is not None:
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=config_file),)
        return sources


# The YAML path is chosen at run time but pydantic-settings asks the class for its sources.
_CONFIG_FILE: dict[str, Path | None] = {"path": None}


class ConfigError(Exception):
    """The configuration is unusable; the message says which setting and why."""


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the YAML file, the environment and ``overrides`` (flags)."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")
    _CONFIG_FILE["path"] = config_file
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE["path"] = None


def host_port(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 hosts may be bracketed)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)
