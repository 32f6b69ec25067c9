"""The one place that maps control-plane protobuf messages to domain objects and back (pure).

Pushed state is mapped to domain objects here and checked by ``gateway.state``'s validators (the
ones the YAML configuration goes through) before it reaches the state holder, so a bad push is
refused as a whole with a precise field path (``providers[1].name: ...``) and the data plane never
sees it. Spooled records go the other way: their JSON payloads become ``UsageRecord`` messages,
and one that cannot be converted is delivered as an ``UnknownRecord`` (never an exception).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import orjson
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from control.spool import SpooledRecord
from control.v1 import control_pb2
from gateway.config import DEFAULT_BASE_URLS
from gateway.state import (
    Actor,
    ClientKey,
    InvalidField,
    McpServer,
    McpToken,
    Provider,
    check_api_keys,
    check_mcp_servers,
    check_mcp_tokens,
    check_providers,
)

__all__ = [
    "InvalidField",
    "api_keys_from_proto",
    "deliverable",
    "duration",
    "mcp_servers_from_proto",
    "mcp_tokens_from_proto",
    "providers_from_proto",
    "record_to_proto",
    "timestamp",
]

_PROVIDER_TYPES = {
    control_pb2.PROVIDER_TYPE_ANTHROPIC: "anthropic",
    control_pb2.PROVIDER_TYPE_OPENAI: "openai",
}
_CREDENTIAL_KINDS = {
    "centralized": control_pb2.CREDENTIAL_KIND_CENTRALIZED,
    "byok": control_pb2.CREDENTIAL_KIND_BYOK,
}


# -- helpers shared with the servicer ---------------------------------------------------------


def timestamp(seconds: float) -> Timestamp:
    """A Timestamp for ``seconds`` since the epoch, exact to the microsecond."""
    # A float of epoch seconds only resolves ~0.24 µs today, so rounding to whole microseconds
    # (via an integer, to avoid float error in the split) gives back exactly the time stamped,
    # where nanoseconds would carry float noise (…123455881 for …123456).
    micros = round(seconds * 1_000_000)
    return Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


def duration(seconds: float) -> Duration:
    """A Duration of ``seconds`` (nanosecond resolution, sign kept on both parts)."""
    out = Duration()
    # FromNanoseconds keeps seconds and nanos of the same sign, as the Duration spec requires.
    out.FromNanoseconds(round(seconds * 1_000_000_000))
    return out


def _expiry(msg: control_pb2.ApiKey | control_pb2.McpAccessToken, path: str) -> float | None:
    # Presence, not zero, decides: an unset Timestamp means "never expires".
    if not msg.HasField("expires_at"):
        return None
    ts = msg.expires_at
    if not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidField(f"{path}.expires_at", "nanos out of range")
    return ts.seconds + ts.nanos / 1_000_000_000


# -- pushed state -----------------------------------------------------------------------------
# Each push is mapped to domain objects, then checked by gateway.state's validators, the same
# ones the YAML configuration goes through.


def providers_from_proto(req: control_pb2.PutProvidersRequest) -> dict[str, Provider]:
    """Validate a PutProviders request and return its providers by name."""
    providers = []
    for p in req.providers:
        # An unknown enum value (a newer host) maps to "", which the validator refuses.
        kind = _PROVIDER_TYPES.get(p.type, "")
        providers.append(
            Provider(
                name=p.name,
                type=kind,
                # Route handlers append paths that start with "/", so a trailing one would double.
                base_url=(p.base_url or DEFAULT_BASE_URLS.get(kind, "")).rstrip("/"),
                api_key=p.api_key,
                send_actor_headers=p.send_actor_headers,
                max_retries=p.max_retries,
            )
        )
    check_providers(providers, "providers")
    return {p.name: p for p in providers}


def api_keys_from_proto(req: control_pb2.PutApiKeysRequest) -> dict[str, ClientKey]:
    """Validate a PutApiKeys request and return its keys by lower-case sha256."""
    keys = []
    for i, k in enumerate(req.api_keys):
        digest = k.key_sha256.lower()
        # Metadata is frozen: the snapshot is shared by every request in flight.
        actor = Actor(k.actor.id, k.actor.username, MappingProxyType(dict(k.actor.metadata)))
        keys.append(ClientKey(k.key_id or digest[:12], digest, actor, _expiry(k, f"api_keys[{i}]")))
    check_api_keys(keys, "api_keys")
    return {k.sha256: k for k in keys}


def mcp_servers_from_proto(req: control_pb2.PutMcpServersRequest) -> dict[str, McpServer]:
    """Validate a PutMcpServers request and return its servers by id."""
    servers = [
        McpServer(
            s.id,
            s.url,
            s.tool_allow_regex,
            s.tool_deny_regex,
            MappingProxyType(dict(s.headers)),
        )
        for s in req.servers
    ]
    check_mcp_servers(servers, "servers")
    return {s.id: s for s in servers}


def mcp_tokens_from_proto(
    req: control_pb2.PutMcpAccessTokensRequest,
) -> dict[tuple[str, str], McpToken]:
    """Validate a PutMcpAccessTokens request and return its tokens by (actor id, server id)."""
    tokens = [
        McpToken(t.actor_id, t.server_id, t.token, _expiry(t, f"tokens[{i}]"))
        for i, t in enumerate(req.tokens)
    ]
    check_mcp_tokens(tokens, "tokens")
    return {(t.actor_id, t.server_id): t for t in tokens}


# -- usage records ----------------------------------------------------------------------------
# Payloads are read with defaults throughout: a spool written by an older daemon may lack fields
# added since, and one unreadable record must not stall the whole stream.


def _str(p: Mapping[str, Any], key: str) -> str:
    value = p.get(key)
    return "" if value is None else str(value)


def _int(p: Mapping[str, Any], key: str) -> int:
    value = p.get(key)
    return int(value) if isinstance(value, int | float) else 0


def _started(p: Mapping[str, Any]) -> control_pb2.InterceptionStarted:
    meta = p.get("actor_metadata") or {}
    out = control_pb2.InterceptionStarted(
        provider=_str(p, "provider"),
        provider_name=_str(p, "provider_name"),
        model=_str(p, "model"),
        actor=control_pb2.Actor(
            id=_str(p, "actor_id"),
            username=_str(p, "username"),
            metadata={str(k): str(v) for k, v in meta.items()},
        ),
        client=_str(p, "client"),
        user_agent=_str(p, "user_agent"),
        credential_kind=_CREDENTIAL_KINDS.get(
            _str(p, "credential_kind"), control_pb2.CREDENTIAL_KIND_UNSPECIFIED
        ),
        credential_hint=_str(p, "credential_hint"),
        streaming=bool(p.get("streaming", False)),
    )
    # Optional fields: absent (not "") when the client sent none, so the host can tell them apart.
    if p.get("client_session_id") is not None:
        out.client_session_id = _str(p, "client_session_id")
    if p.get("correlating_tool_call_id") is not None:
        out.correlating_tool_call_id = _str(p, "correlating_tool_call_id")
    return out


def _token_usage(p: Mapping[str, Any]) -> control_pb2.TokenUsage:
    extra = p.get("extra") or {}
    return control_pb2.TokenUsage(
        msg_id=_str(p, "msg_id"),
        input_tokens=_int(p, "input"),
        output_tokens=_int(p, "output"),
        cache_read_input_tokens=_int(p, "cache_read"),
        cache_write_input_tokens=_int(p, "cache_write"),
        cache_write_5m_input_tokens=_int(p, "cache_write_5m"),
        cache_write_1h_input_tokens=_int(p, "cache_write_1h"),
        reasoning_output_tokens=_int(p, "reasoning"),
        extra={str(k): int(v) for k, v in extra.items() if isinstance(v, int | float)},
    )


def record_to_proto(rec: SpooledRecord) -> control_pb2.UsageRecord:
    """The ``UsageRecord`` for a spooled record; ValueError for an unknown kind.

    A malformed payload raises whatever its conversion hits: :func:`deliverable` is the form
    that never raises.
    """
    p = rec.payload
    out = control_pb2.UsageRecord(
        seq=rec.seq,
        record_id=rec.record_id,
        interception_id=rec.interception_id,
        created_at=timestamp(rec.created_at),
    )
    # CopyFrom (not field assignment) so the oneof is set even when every field is a default.
    match rec.kind:
        case "interception_started":
            out.interception_started.CopyFrom(_started(p))
        case "interception_ended":
            out.interception_ended.CopyFrom(
                control_pb2.InterceptionEnded(
                    status=_str(p, "status"),
                    error_type=_str(p, "error_type"),
                    error_message=_str(p, "error_message"),
                    upstream_status=_int(p, "upstream_status"),
                )
            )
        case "token_usage":
            out.token_usage.CopyFrom(_token_usage(p))
        case "prompt_usage":
            fields = {k: _str(p, k) for k in ("msg_id", "prompt")}
            out.prompt_usage.CopyFrom(control_pb2.PromptUsage(**fields))
        case "tool_usage":
            out.tool_usage.CopyFrom(
                control_pb2.ToolUsage(
                    msg_id=_str(p, "msg_id"),
                    tool=_str(p, "tool"),
                    tool_call_id=_str(p, "tool_call_id"),
                    input=_str(p, "args"),
                    injected=bool(p.get("injected", False)),
                    server_url=_str(p, "server_url"),
                    invocation_error=_str(p, "invocation_error"),
                    # Absent from records spooled before the field existed: "".
                    item_id=_str(p, "item_id"),
                )
            )
        case "model_thought":
            fields = {k: _str(p, k) for k in ("msg_id", "content", "source")}
            out.model_thought.CopyFrom(control_pb2.ModelThought(**fields))
        case _:
            raise ValueError(f"unknown record kind {rec.kind!r}")
    return out


KINDS = frozenset(
    {
        "interception_started",
        "interception_ended",
        "token_usage",
        "prompt_usage",
        "tool_usage",
        "model_thought",
    }
)


def deliverable(rec: SpooledRecord) -> tuple[control_pb2.UsageRecord, str, str]:
    """``(record, reason, detail)``; never raises, so one bad record cannot stop the stream.

    ``reason`` is "" for a converted record; otherwise the record is an ``UnknownRecord``
    carrying the spooled JSON, ``reason`` is ``unknown_kind`` (a kind from a newer daemon) or
    ``malformed`` (a payload without its kind's shape), and ``detail`` says what failed without
    quoting the payload (it holds prompts).
    """
    if not isinstance(rec.kind, str) or not rec.kind:
        reason, detail = "malformed", _unread(rec) if rec.raw else "no kind"
    elif rec.kind not in KINDS:
        reason, detail = "unknown_kind", f"unknown kind {rec.kind[:64]!r}"
    elif rec.raw:
        reason, detail = "malformed", _unread(rec)
    else:
        try:
            return record_to_proto(rec), "", ""
        # Whatever a payload of the wrong shape makes the conversion raise (AttributeError for a
        # list where an object belongs, ValueError for an out-of-range number, ...).
        except Exception as exc:
            reason, detail = "malformed", type(exc).__name__
    return _unknown(rec, reason), reason, detail


def _unread(rec: SpooledRecord) -> str:
    """What the spool could not read of a record whose bytes it kept (``rec.raw``)."""
    if not rec.payload:
        return "not a JSON object"
    if not rec.kind:
        return "no kind"
    if "interception_id" not in rec.payload:
        return "no interception_id"
    if not isinstance(rec.payload["interception_id"], str):
        return "interception_id not text"
    return "bad time stamp"


def _unknown(rec: SpooledRecord, reason: str) -> control_pb2.UsageRecord:
    out = control_pb2.UsageRecord(
        seq=rec.seq, record_id=_text(rec.record_id), interception_id=_text(rec.interception_id)
    )
    # Left unset when the time stamp is missing or is itself what is malformed.
    if rec.created_at:
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            out.created_at.CopyFrom(timestamp(rec.created_at))
    # The bytes as stored when the spool kept them (it could not read the record whole);
    # otherwise the parsed line again, the same JSON.
    payload = rec.raw
    if not payload:
        try:
            payload = orjson.dumps(rec.payload)
        except (TypeError, orjson.JSONEncodeError):
            payload = b""
    out.unknown.CopyFrom(
        control_pb2.UnknownRecord(kind=_text(rec.kind), payload=payload, reason=reason)
    )
    return out


def _text(value: object) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)
