"""Immutable gateway state and the holder that swaps it atomically (pure).

Request handlers read ``holder.current`` once and use that snapshot to the end, so a state
change (from the config file now, from the host's pushes later) never disturbs a request in flight.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

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


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a request needs to know about configuration, frozen."""

    providers: Mapping[str, Provider]
    keys: Mapping[str, ClientKey]
    allow_byok: bool = True
    version: int = 0

    @property
    def personal_mode(self) -> bool:
        """No gateway keys: clients bring their own provider key (zero-config mode)."""
        return not self.keys

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
            )
        keys: dict[str, ClientKey] = {}
        for k in settings.api_keys:
            digest = k.key_sha256 or sha256_hex(k.key or "")
            actor = Actor(k.actor_id, k.username, MappingProxyType(dict(k.metadata)))
            keys[digest] = ClientKey(k.key_id or digest[:12], digest, actor, k.expires_at)
        return cls(MappingProxyType(providers), MappingProxyType(keys), settings.allow_byok)


class StateHolder:
    """Holds the current snapshot; ``swap`` replaces it in one assignment."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot

    def swap(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the state every new request sees."""
        self.current = snapshot
