"""Daemon settings: defaults < YAML file < ``AIBRIDGED_*`` environment < command-line flags.

Pure data: nothing here opens sockets or reads secrets' contents into logs. Lists (providers,
API keys, MCP servers) come from the YAML file, or from the environment as JSON
(``AIBRIDGED_PROVIDERS='[{"name": "anthropic", ...}]'``). This module checks their structure
(types, required fields); the rules on their values are the state's own
(``gateway.state.check_*``), shared with the host's pushes, and applied by
``Snapshot.from_settings``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
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

    name: str
    type: Literal["anthropic", "openai"]
    base_url: str = ""
    api_key: str | None = Field(default=None, repr=False)
    api_key_env: str | None = None
    send_actor_headers: bool = False
    # Retries before the first byte reaches the client (connection errors, 429, 5xx, 529).
    max_retries: int = 0

    @model_validator(mode="after")
    def _defaults(self) -> ProviderConfig:
        if not self.base_url:
            self.base_url = DEFAULT_BASE_URLS[self.type]
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
    # One per type, so Claude Code (/anthropic) and Codex or any OpenAI client (/openai) work
    # with no configuration at all.
    return [
        ProviderConfig(name="anthropic", type="anthropic", api_key_env="ANTHROPIC_API_KEY"),
        ProviderConfig(name="openai", type="openai", api_key_env="OPENAI_API_KEY"),
    ]


class Settings(BaseSettings):
    """Every setting of ``aibridged serve``; each is also a flag and an ``AIBRIDGED_*`` variable."""

    model_config = SettingsConfigDict(env_prefix="AIBRIDGED_", extra="forbid")

    listen: str = Field(
        default="127.0.0.1:8080", description="data plane address: HOST:PORT or unix:/path"
    )
    control_listen: str = Field(
        default="127.0.0.1:8081", description="gRPC control plane address: HOST:PORT or unix:/path"
    )
    metrics_listen: str = Field(
        default="127.0.0.1:2112",
        description="Prometheus GET /metrics address: HOST:PORT or unix:/path",
    )
    spool_path: Path = Field(
        default=Path("aibridged.db"),
        description="SQLite spool holding every usage record until the host acknowledges it",
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        gt=0,
        description="larger request bodies, as sent or once decoded, get 413",
    )
    # Slow or idle clients (slowloris): a connection must send a request's headers within
    # client_header_timeout of its first byte (of opening, for a new connection), the body with no
    # gap between reads longer than client_body_timeout, and is closed after
    # client_keepalive_timeout idle between requests (above a load balancer's own idle timeout).
    client_header_timeout: float = Field(
        default=10.0, gt=0, description="seconds a connection has to send a request's headers"
    )
    client_body_timeout: float = Field(
        default=60.0,
        gt=0,
        description="seconds a client may pause between two reads of a request body (then 408)",
    )
    # A whole body, however steady its trickle: without it a byte a minute holds a connection
    # (and a descriptor) for weeks.
    client_body_total_timeout: float = Field(
        default=300.0,
        gt=0,
        description="seconds a whole request body may take, however steady (then 408)",
    )
    client_keepalive_timeout: float = Field(
        default=75.0,
        gt=0,
        description="seconds an idle keep-alive connection is kept between requests",
    )
    ping_interval: float = Field(
        default=10.0,
        gt=0,
        description="seconds of upstream silence before a ping keep-alive goes to the client",
    )
    shutdown_grace: float = Field(
        default=30.0, ge=0, description="seconds in-flight requests get to finish on SIGTERM/SIGINT"
    )
    upstream_connect_timeout: float = Field(
        default=10.0, gt=0, description="seconds to connect to a provider"
    )
    upstream_idle_timeout: float = Field(
        default=600.0,
        gt=0,
        description="seconds without a byte from the provider before the call fails",
    )
    on_client_disconnect: Literal["drain", "cancel"] = Field(
        default="drain",
        description="drain: read the upstream to its final usage; cancel: close it at once",
    )
    disconnect_drain_timeout: float = Field(
        default=120.0, ge=0, description="bound in seconds on that drain"
    )
    allow_byok: bool = Field(
        default=True, description="accept the client's own provider key in byok_header"
    )
    require_control: bool = Field(
        default=False,
        description="managed sidecar: not ready (503) until the host pushed providers and keys",
    )
    control_token: str | None = Field(
        default=None,
        repr=False,
        description="bearer token every control RPC must carry; no token = control plane off",
    )
    control_token_file: Path | None = Field(
        default=None, description="file holding the control token (e.g. a mounted secret)"
    )
    control_tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate chain: serve the control plane over TLS"
    )
    control_tls_key_file: Path | None = Field(
        default=None, description="PEM private key of control_tls_cert_file"
    )
    control_tls_client_ca_file: Path | None = Field(
        default=None, description="require client certificates signed by this CA (mTLS)"
    )
    control_grace: float = Field(
        default=5.0, ge=0, description="seconds open control RPCs get at shutdown"
    )
    spool_max_records: int = Field(
        default=5_000_000,
        gt=0,
        description="unacknowledged records beyond this many are dropped (counted, logged)",
    )
    spool_max_age: float = Field(
        default=7 * 86400.0,
        gt=0,
        description="seconds after which unacknowledged records are dropped",
    )
    spool_flush_timeout: float = Field(
        default=5.0,
        gt=0,
        description="seconds the spool may leave records uncommitted before it reports degraded",
    )
    metrics_enabled: bool = Field(
        default=True, description="serve Prometheus metrics on metrics_listen"
    )
    # Observability (issue 11): metric label bounds and the log format.
    metrics_model_pattern: str = Field(
        default=r"[A-Za-z0-9._:@/-]{1,100}",
        description="regex the whole requested model must match to be a metric label"
        " (else 'other')",
    )
    metrics_max_models: int = Field(
        default=50,
        ge=0,
        description="distinct model labels kept; models seen after that are 'other'",
    )
    metrics_actor_labels: bool = Field(
        default=False,
        description="add an actor label to interception and token metrics (one series per"
        " actor: only for a small, known set of actors)",
    )
    log_format: Literal["json", "text"] | None = Field(
        default=None,
        description="json (one object a line) or text; unset: json unless stderr is a terminal",
    )

    @field_validator("metrics_model_pattern")
    @classmethod
    def _metrics_regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regex: {exc}") from None
        return value

    mcp_call_timeout: float = Field(
        default=60.0, gt=0, description="seconds per injected MCP tool call"
    )
    mcp_list_timeout: float = Field(
        default=5.0, gt=0, description="seconds per MCP server tool listing"
    )
    mcp_list_ttl: float = Field(default=300.0, gt=0, description="seconds a tool listing is reused")
    mcp_max_iterations: int = Field(
        default=10,
        ge=1,
        le=100,
        description="upstream calls one request may make while the model calls injected tools",
    )
    small_model_pattern: str = Field(
        default="haiku",
        description="regex (case-insensitive) on the model: matches get no injected tools",
    )
    byok_header: str = Field(
        default="x-aibridged-provider-key",
        description="header carrying the client's own provider key",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="log verbosity"
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop", description="event loop implementation"
    )
    providers: list[ProviderConfig] = Field(
        default_factory=_default_providers,
        description="upstream providers: route prefix, type, base URL, central key",
    )
    api_keys: list[ApiKeyConfig] = Field(
        default_factory=list,
        description="gateway client keys and the actors they authenticate; none = personal mode",
    )
    mcp_servers: list[McpServerConfig] = Field(
        default_factory=list, description="central MCP servers whose tools every request gets"
    )

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
        """The control-plane token, from the setting or its file (stripped); None if unset.

        :class:`ConfigError` when the file cannot be read or holds no token.
        """
        if self.control_token:
            return self.control_token
        path = self.control_token_file
        if path is None:
            return None
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"control_token_file: cannot read {path}: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"control_token_file: {path} is not UTF-8 text") from None
        if not token:
            raise ConfigError(f"control_token_file: {path} is empty")
        return token

    @field_validator("small_model_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regex: {exc}") from None
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
    """The configuration is unusable; the message (one line) says which setting and why.

    Raised at start-up too, for what only starting reveals (a port in use, an unreadable file):
    ``aibridged serve`` prints it and exits with status 2.
    """


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the YAML file, the environment and ``overrides`` (flags).

    An unreadable file, bad YAML or a bad JSON variable is a :class:`ConfigError`; invalid values
    are pydantic's ``ValidationError`` (:func:`describe_invalid` makes it one line).
    """
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"invalid configuration: config file not found: {config_file}")
    _CONFIG_FILE["path"] = config_file
    try:
        if config_file is not None:
            _check_yaml_shape(config_file)
        return Settings(**overrides)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid configuration: {_yaml_problem(config_file, exc)}") from None
    except OSError as exc:
        raise ConfigError(
            f"invalid configuration: cannot read {config_file}: {exc.strerror or exc}"
        ) from None
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {_source_problem(exc)}") from None
    finally:
        _CONFIG_FILE["path"] = None


def describe_invalid(exc: ValidationError) -> str:
    """One line naming each invalid setting, without echoing values (they may be secrets)."""
    problems = []
    for error in exc.errors():
        where = "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]
        )
        message = str(error["msg"]).removeprefix("Value error, ").replace("\n", " ")
        problems.append(f"{where.lstrip('.')}: {message}" if where else message)
    return "invalid configuration: " + "; ".join(problems)


def _check_yaml_shape(path: Path) -> None:
    """Refuse a file pydantic-settings would fail on with a traceback: not UTF-8, or a top
    level that is not a mapping of settings (a list, a scalar)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"invalid configuration: {path}: not UTF-8 text") from None
    loaded = yaml.safe_load(text)
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(
            f"invalid configuration: {path}: the top level must be a mapping of settings,"
            f" not a {type(loaded).__name__}"
        )


def _yaml_problem(path: Path | None, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"{path}: not valid YAML{where}: {problem}"


_SOURCE = re.compile(r'field "(\w+)" from source "(\w+)"')


def _source_problem(exc: SettingsError) -> str:
    # pydantic-settings says 'error parsing value for field "providers" from source
    # "EnvSettingsSource"'; the operator set AIBRIDGED_PROVIDERS, so that is what to name.
    found = _SOURCE.search(str(exc))
    if found is None:
        return str(exc)
    name, source = found.groups()
    setting = f"AIBRIDGED_{name.upper()}" if source.startswith("Env") else name
    # json.JSONDecodeError says where, never the value (which may hold keys).
    cause = exc.__cause__
    reason = f"not valid JSON: {cause}" if isinstance(cause, ValueError) else "unreadable value"
    return f"{setting}: {reason}"


def host_port(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 hosts may be bracketed)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)
