"""Immutable gateway state and the holder that swaps it atomically (pure).

Request handlers read ``holder.current`` once and use that snapshot to the end, so a state
change (from the config file now, from the host's pushes later) never disturbs a request in flight.
"""

from __future__ import annotations

import hmac
import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from gateway.config import (
    DEFAULT_BASE_URLS,
    DEFAULT_KEY_ENVS,
    PROVIDER_NAME_PATTERN,
    ConfigError,
    Settings,
)
from gateway.identity import sha256_hex

MAX_RETRIES = 10
MCP_SERVER_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HEADER_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")


@dataclass(frozen=True, slots=True)
class Actor:
    """The user on whose behalf a request is made."""

    id: str
    username: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClientKey:
    """A gateway key, held only as its sha256."""

    key_id: str
    sha256: str
    actor: Actor
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Provider:
    """An upstream provider as the data plane uses it."""

    name: str
    type: str
    base_url: str
    api_key: str = field(default="", repr=False)
    send_actor_headers: bool = False
    max_retries: int = 0

    def url(self, path: str, query: str = "") -> str:
        """``path`` (with a leading slash) on this provider; ``base_url`` has no trailing one."""
        return f"{self.base_url}{path}?{query}" if query else self.base_url + path


@dataclass(frozen=True, slots=True)
class McpServer:
    """A central MCP server whose tools are injected."""

    id: str
    url: str
    tool_allow_regex: str = ""
    tool_deny_regex: str = ""
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class McpToken:
    """An actor's access token for one MCP server."""

    actor_id: str
    server_id: str
    token: str = field(repr=False)
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Versions:
    """The applied version of each part of the state (0: never pushed)."""

    providers: int = 0
    api_keys: int = 0
    mcp_servers: int = 0
    mcp_tokens: int = 0


class StaleVersion(Exception):
    """A push carried an older version than the one applied."""


class InvalidField(ValueError):
    """A state field is invalid; ``str()`` is ``"<field path>: <reason>"``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# -- validation -------------------------------------------------------------------------------
# One set of rules for the state, whether it comes from the YAML file (Snapshot.from_settings)
# or from a host's push (control.convert): what one path refuses, the other refuses too, so
# nothing either accepts can fail later on the request path. ``path`` names the list as its
# source calls it ("mcp_servers" in YAML, "servers" in PutMcpServers).


def _matches(pattern: str, value: str) -> bool:
    # fullmatch, because the patterns end in "$", which re.match also accepts before a
    # trailing newline: "abc\n" must not pass as a route prefix or a tool-name part.
    return re.fullmatch(pattern, value) is not None


def check_url(path: str, url: str) -> None:
    """An absolute http(s) URL with a host; the URL is never echoed (it may hold credentials)."""
    if not url:
        raise InvalidField(path, "required")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise InvalidField(path, "malformed URL: contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port, which we want to report
    except ValueError as exc:
        raise InvalidField(path, f"malformed URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidField(path, "malformed URL: scheme must be http or https")
    if not parts.hostname:
        raise InvalidField(path, "malformed URL: missing host")


def check_header_value(path: str, value: str) -> None:
    """A value that goes into an HTTP header verbatim (never echoed: it may be a secret)."""
    # A CR or LF would split the header (injection); aiohttp refuses every control character
    # but tab, and only at request time: every request would then fail.
    if any((ch < " " and ch != "\t") or ch == "\x7f" for ch in value):
        raise InvalidField(path, "must not contain control characters (CR, LF, NUL...)")


def check_regex(path: str, pattern: str) -> None:
    """A pattern ``re`` compiles (tool filters are compiled on the request path)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidField(path, f"invalid regex: {exc}") from None


def check_providers(providers: Sequence[Provider], path: str = "providers") -> None:
    """Route-safe unique names, a known type, bounded retries, a usable URL and key."""
    seen: set[str] = set()
    for i, p in enumerate(providers):
        at = f"{path}[{i}]"
        if not _matches(PROVIDER_NAME_PATTERN, p.name):
            raise InvalidField(f"{at}.name", f"must match {PROVIDER_NAME_PATTERN}")
        if p.name in seen:
            raise InvalidField(f"{at}.name", f"duplicate provider name {p.name!r}")
        seen.add(p.name)
        if p.type not in DEFAULT_BASE_URLS:
            raise InvalidField(f"{at}.type", "unknown provider type")
        if p.max_retries < 0:
            raise InvalidField(f"{at}.max_retries", "must not be negative")
        if p.max_retries > MAX_RETRIES:
            raise InvalidField(f"{at}.max_retries", f"at most {MAX_RETRIES}")
        check_url(f"{at}.base_url", p.base_url)
        check_header_value(f"{at}.api_key", p.api_key)


def check_api_keys(
    keys: Sequence[ClientKey], path: str = "api_keys", actor_id_field: str = "actor.id"
) -> None:
    """Lower-case sha256 digests, each once, each with an actor id."""
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        at = f"{path}[{i}]"
        # Lookups hash the presented key to lower-case hex, so that is the only form that matches.
        if not _SHA256_HEX.fullmatch(k.sha256):
            raise InvalidField(f"{at}.key_sha256", "must be 64 hex characters (a sha256)")
        if k.sha256 in first:
            raise InvalidField(f"{at}.key_sha256", f"duplicate of {path}[{first[k.sha256]}]")
        if not k.actor.id:
            raise InvalidField(f"{at}.{actor_id_field}", "required")
        # The actor goes upstream as X-AI-Bridge-Actor-* headers (send_actor_headers).
        check_header_value(f"{at}.{actor_id_field}", k.actor.id)
        for name, value in k.actor.metadata.items():
            if not name or not set(name) <= _HEADER_NAME_CHARS:
                raise InvalidField(f"{at}.metadata[{name!r}]", "invalid header name")
            check_header_value(f"{at}.metadata[{name!r}]", value)
        first[k.sha256] = i


def check_mcp_servers(servers: Sequence[McpServer], path: str = "servers") -> None:
    """Unique ids usable in tool names, a usable URL, compilable filters, valid headers."""
    seen: set[str] = set()
    for i, s in enumerate(servers):
        at = f"{path}[{i}]"
        if not s.id:
            raise InvalidField(f"{at}.id", "required")
        # The id becomes part of injected tool names, which providers restrict to this alphabet.
        if not _matches(MCP_SERVER_ID_PATTERN, s.id):
            raise InvalidField(f"{at}.id", f"must match {MCP_SERVER_ID_PATTERN}")
        if s.id in seen:
            raise InvalidField(f"{at}.id", f"duplicate server id {s.id!r}")
        seen.add(s.id)
        check_url(f"{at}.url", s.url)
        check_regex(f"{at}.tool_allow_regex", s.tool_allow_regex)
        check_regex(f"{at}.tool_deny_regex", s.tool_deny_regex)
        for name, value in s.headers.items():
            if not name or not set(name) <= _HEADER_NAME_CHARS:
                raise InvalidField(f"{at}.headers[{name!r}]", "invalid header name")
            check_header_value(f"{at}.headers[{name!r}]", value)


def check_mcp_tokens(tokens: Sequence[McpToken], path: str = "tokens") -> None:
    """Each token names its actor and server, once, and is a valid header value."""
    first: dict[tuple[str, str], int] = {}
    for i, t in enumerate(tokens):
        at = f"{path}[{i}]"
        for name, value in (("actor_id", t.actor_id), ("server_id", t.server_id)):
            if not value:
                raise InvalidField(f"{at}.{name}", "required")
        if not t.token:
            raise InvalidField(f"{at}.token", "required")
        # Sent as "Authorization: Bearer <token>"; never echoed in the error.
        check_header_value(f"{at}.token", t.token)
        key = (t.actor_id, t.server_id)
        if key in first:
            raise InvalidField(at, f"duplicate of {path}[{first[key]}] (same actor and server)")
        first[key] = i


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a request needs to know about configuration, frozen."""

    providers: Mapping[str, Provider]
    keys: Mapping[str, ClientKey]
    allow_byok: bool = True
    mcp_servers: Mapping[str, McpServer] = field(default_factory=dict)
    mcp_tokens: Mapping[tuple[str, str], McpToken] = field(default_factory=dict)
    versions: Versions = Versions()
    # Managed by a host: never falls back to personal mode, even with no keys pushed.
    managed: bool = False

    @property
    def personal_mode(self) -> bool:
        """Standalone with no gateway keys: clients bring their own provider key."""
        return not self.managed and not self.keys

    @property
    def configured(self) -> bool:
        """Whether the data plane can serve: standalone, or the host pushed providers and keys."""
        return not self.managed or (self.versions.providers > 0 and self.versions.api_keys > 0)

    def find_key(self, presented: str) -> ClientKey | None:
        """The gateway key matching ``presented``, compared by hash in constant time."""
        digest = sha256_hex(presented)
        found = self.keys.get(digest)
        if found is not None and hmac.compare_digest(found.sha256, digest):
            return found
        return None

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str] = os.environ) -> Snapshot:
        """Build the standalone state from the configuration file and environment.

        Checked by the rules the host's pushes follow; :class:`ConfigError` names the first
        invalid field (``mcp_servers[0].tool_deny_regex: invalid regex: ...``).
        """
        providers = [
            Provider(
                name=p.name,
                type=p.type,
                base_url=p.base_url.rstrip("/"),
                api_key=p.api_key or _env_key(p.api_key_env or DEFAULT_KEY_ENVS[p.type], environ),
                send_actor_headers=p.send_actor_headers,
                max_retries=p.max_retries,
            )
            for p in settings.providers
        ]
        keys = []
        for k in settings.api_keys:
            digest = k.key_sha256 or sha256_hex(k.key or "")
            actor = Actor(k.actor_id, k.username, MappingProxyType(dict(k.metadata)))
            keys.append(ClientKey(k.key_id or digest[:12], digest, actor, k.expires_at))
        servers = [
            McpServer(
                m.id,
                m.url,
                m.tool_allow_regex,
                m.tool_deny_regex,
                MappingProxyType(dict(m.headers)),
            )
            for m in settings.mcp_servers
        ]
        try:
            check_providers(providers, "providers")
            check_api_keys(keys, "api_keys", actor_id_field="actor_id")
            check_mcp_servers(servers, "mcp_servers")
        except InvalidField as exc:
            raise ConfigError(f"invalid configuration: {exc}") from None
        return cls(
            MappingProxyType({p.name: p for p in providers}),
            MappingProxyType({k.sha256: k for k in keys}),
            settings.allow_byok,
            mcp_servers=MappingProxyType({m.id: m for m in servers}),
            managed=settings.require_control,
        )


def _env_key(name: str, environ: Mapping[str, str]) -> str:
    # Secrets mounted from files often end in a newline, which no key contains.
    return environ.get(name, "").strip()


def unset_key_envs(settings: Settings, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Providers with no central key in the settings, by name: the variable that is unset."""
    out: dict[str, str] = {}
    for p in settings.providers:
        name = p.api_key_env or DEFAULT_KEY_ENVS[p.type]
        if not p.api_key and not _env_key(name, environ):
            out[p.name] = name
    return out


class StateHolder:
    """Holds the current snapshot; each ``put_*`` replaces one part in a single assignment.

    A push carries the full state of its part and a version: an older version than the applied
    one raises :class:`StaleVersion`; the same version again is applied again (idempotent).
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot

    def put_providers(
        self, version: int, providers: Mapping[str, Provider], allow_byok: bool
    ) -> Snapshot:
        """Replace every provider (and the BYOK switch)."""
        return self._put(
            "providers", version, providers=MappingProxyType(dict(providers)), allow_byok=allow_byok
        )

    def put_api_keys(self, version: int, keys: Mapping[str, ClientKey]) -> Snapshot:
        """Replace every client key (keys not listed are revoked)."""
        return self._put("api_keys", version, keys=MappingProxyType(dict(keys)))

    def put_mcp_servers(self, version: int, servers: Mapping[str, McpServer]) -> Snapshot:
        """Replace every MCP server config."""
        return self._put("mcp_servers", version, mcp_servers=MappingProxyType(dict(servers)))

    def put_mcp_tokens(self, version: int, tokens: Mapping[tuple[str, str], McpToken]) -> Snapshot:
        """Replace every per-actor MCP access token."""
        return self._put("mcp_tokens", version, mcp_tokens=MappingProxyType(dict(tokens)))

    def _put(self, part: str, version: int, **changes: Any) -> Snapshot:
        cur = self.current
        applied: int = getattr(cur.versions, part)
        if version < applied:
            raise StaleVersion(f"{part}: version {version} is older than applied {applied}")
        versions = replace(cur.versions, **{part: version})
        return self._swap(replace(cur, versions=versions, **changes))

    def _swap(self, snapshot: Snapshot) -> Snapshot:
        self.current = snapshot
        return snapshot
