"""Client authentication and provider-credential selection (pure).

Gateway key mode: the client presents a gateway key (``x-api-key`` or ``Authorization: Bearer``)
that maps to an actor; the central provider key is used unless the client sends its own in the
BYOK header and the deployment allows it. Personal mode (no gateway keys configured): the
client's own provider key is forwarded, and the actor is derived from its fingerprint.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.identity import extract_bearer, is_utf8, mask_secret, sha256_hex
from gateway.intercept.dialect import KeyScheme
from gateway.records import CredentialKind
from gateway.state import Actor, Provider, Snapshot


@dataclass(frozen=True, slots=True)
class Credential:
    """The one auth header sent upstream, and how it is described in records."""

    header: str
    value: str = field(repr=False)
    kind: CredentialKind
    hint: str


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A request that may proceed."""

    actor: Actor
    credential: Credential


@dataclass(frozen=True, slots=True)
class Refused:
    """A request that must be answered with ``status`` and ``message``."""

    status: int
    message: str


def authenticate(
    headers: Mapping[str, str],
    snapshot: Snapshot,
    provider: Provider,
    keys: KeyScheme,
    byok_header: str,
    now: float | None = None,
) -> Authenticated | Refused:
    """Decide who is calling and which provider credential goes upstream.

    ``keys``: how the provider type takes its keys (the route's ``ProviderApi.keys``).
    """
    api_key = (headers.get("x-api-key") or "").strip()
    bearer = extract_bearer(headers.get("authorization"))
    if snapshot.personal_mode:
        return _personal(api_key, bearer, provider, keys)
    if not api_key and not bearer:
        return Refused(
            401, "missing gateway API key: send it in x-api-key or Authorization: Bearer"
        )
    key = None
    for candidate in (api_key, bearer):
        if candidate:
            key = snapshot.find_key(candidate)
            if key is not None:
                break
    if key is None:
        return Refused(401, "invalid gateway API key")
    if key.expires_at is not None and key.expires_at <= (now if now is not None else time.time()):
        return Refused(401, "gateway API key has expired")
    own_key = (headers.get(byok_header) or "").strip()
    if own_key:
        if not snapshot.allow_byok:
            return Refused(403, f"bring-your-own-key is disabled on this gateway ({byok_header})")
        if not is_utf8(own_key):
            return Refused(401, f"invalid provider key in {byok_header}: not valid UTF-8")
        return Authenticated(key.actor, _credential(own_key, "byok", keys))
    if not provider.api_key:
        return Refused(
            401,
            f"provider {provider.name!r} has no central API key; "
            f"send your own provider key in the {byok_header} header",
        )
    return Authenticated(key.actor, _central_credential(provider.api_key, keys))


@functools.lru_cache(maxsize=64)
def _central_credential(api_key: str, keys: KeyScheme) -> Credential:
    # Built once per provider key (masking it costs more than the rest of authentication).
    # Only central keys are cached: the gateway holds them anyway, unlike users' own keys.
    return _credential(api_key, "centralized", keys)


def _personal(
    api_key: str, bearer: str, provider: Provider, keys: KeyScheme
) -> Authenticated | Refused:
    # The client's own key goes upstream and its fingerprint into records: bytes that are not
    # UTF-8 can be neither, and no provider issues such a key.
    if not is_utf8(api_key or bearer):
        return Refused(401, "invalid API key: not valid UTF-8")
    if api_key:
        secret, credential = api_key, _credential(api_key, "byok", keys)
    elif bearer:
        secret, credential = bearer, _credential("Bearer " + bearer, "byok", keys)
    elif provider.api_key:
        return Authenticated(Actor("local", "local"), _central_credential(provider.api_key, keys))
    else:
        return Refused(401, f"missing API key: send your provider key in {keys.label}")
    fingerprint = sha256_hex(secret)[:16]
    return Authenticated(Actor(f"key-{fingerprint}", mask_secret(secret)), credential)


def _credential(value: str, kind: CredentialKind, keys: KeyScheme) -> Credential:
    # OAuth tokens (Claude subscriptions) travel as Authorization: Bearer, API keys as the
    # provider type takes them (Anthropic: x-api-key; OpenAI: Authorization: Bearer, whatever
    # the key's prefix).
    if value.startswith("Bearer "):
        return Credential("authorization", value, kind, mask_secret(value[7:]))
    return Credential(keys.header, keys.prefix + value, kind, mask_secret(value))
