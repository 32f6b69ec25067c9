"""Immutable gateway state and the holder that swaps it atomically (pure).

Request handlers read ``holder.current`` once and use that snapshot to the end, so a state
change (from the config file now, from the host's pushes later) never disturbs a request in flight.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from gateway.config import DEFAULT_KEY_ENVS, Settings
from gateway.identity import sha256_hex


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
        """Build the standalone state from the configuration file and environment."""
        providers: dict[str, Provider] = {}
        for p in settings.providers:
            key = p.api_key or environ.get(p.api_key_env or DEFAULT_KEY_ENVS[p.type], "")
            providers[p.name] = Provider(
                name=p.name,
                type=p.type,
                base_url=p.base_url.rstrip("/"),
                api_key=key,
                send_actor_headers=p.send_actor_headers,
                max_retries=p.max_retries,
            )
        keys: dict[str, ClientKey] = {}
        for k in settings.api_keys:
            digest = k.key_sha256 or sha256_hex(k.key or "")
            actor = Actor(k.actor_id, k.username, MappingProxyType(dict(k.metadata)))
            keys[digest] = ClientKey(k.key_id or digest[:12], digest, actor, k.expires_at)
        servers = {
            m.id: McpServer(
                m.id,
                m.url,
                m.tool_allow_regex,
                m.tool_deny_regex,
                MappingProxyType(dict(m.headers)),
            )
            for m in settings.mcp_servers
        }
        return cls(
            MappingProxyType(providers),
            MappingProxyType(keys),
            settings.allow_byok,
            mcp_servers=MappingProxyType(servers),
            managed=settings.require_control,
        )


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
