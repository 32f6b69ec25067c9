"""The one place that maps control-plane protobuf messages to domain objects and back (pure).

Pushed state is validated here, before it reaches the state holder, so a bad push is refused as a
whole with a precise field path (``providers[1].name: ...``) and the data plane never sees it.
Spooled records go the other way: their JSON payloads become ``UsageRecord`` messages.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from control.spool import SpooledRecord
from control.v1 import control_pb2
from gateway.config import DEFAULT_BASE_URLS, PROVIDER_NAME_PATTERN
from gateway.state import Actor, ClientKey, McpServer, McpToken, Provider

MAX_RETRIES = 10
MCP_SERVER_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HEADER_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
_PROVIDER_TYPES = {
    control_pb2.PROVIDER_TYPE_ANTHROPIC: "anthropic",
    control_pb2.PROVIDER_TYPE_OPENAI: "openai",
}
_CREDENTIAL_KINDS = {
    "centralized": control_pb2.CREDENTIAL_KIND_CENTRALIZED,
    "byok": control_pb2.CREDENTIAL_KIND_BYOK,
}


class InvalidField(ValueError):
    """A pushed field is invalid; ``str()`` is ``"<field path>: <reason>"``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


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


# -- validation -------------------------------------------------------------------------------


def _matches(pattern: str, value: str) -> bool:
    # fullmatch, because the patterns end in "$", which re.match also accepts before a
    # trailing newline: "abc\n" must not pass as a route prefix or a tool-name part.
    return re.fullmatch(pattern, value) is not None


def _check_url(path: str, url: str) -> None:
    if not url:
        raise InvalidField(path, "required")
    # The URL itself is not echoed: it may carry credentials in its userinfo or query.
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


def _check_header_value(path: str, value: str) -> None:
    # A CR or LF would split the header (injection); aiohttp would only fail at request time.
    if any(ch in "\r\n\x00" for ch in value):
        raise InvalidField(path, "must not contain CR, LF or NUL")


def _check_regex(path: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidField(path, f"invalid regex: {exc}") from None


def _expiry(msg: control_pb2.ApiKey | control_pb2.McpAccessToken, path: str) -> float | None:
    # Presence, not zero, decides: an unset Timestamp means "never expires".
    if not msg.HasField("expires_at"):
        return None
    ts = msg.expires_at
    if not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidField(f"{path}.expires_at", "nanos out of range")
    return ts.seconds + ts.nanos / 1_000_000_000


# -- pushed state -----------------------------------------------------------------------------


def providers_from_proto(req: control_pb2.PutProvidersRequest) -> dict[str, Provider]:
    """Validate a PutProviders request and return its providers by name."""
    out: dict[str, Provider] = {}
    for i, p in enumerate(req.providers):
        path = f"providers[{i}]"
        if not _matches(PROVIDER_NAME_PATTERN, p.name):
            raise InvalidField(f"{path}.name", f"must match {PROVIDER_NAME_PATTERN}")
        if p.name in out:
            raise InvalidField(f"{path}.name", f"duplicate provider name {p.name!r}")
        kind = _PROVIDER_TYPES.get(p.type)
        if kind is None:
            raise InvalidField(f"{path}.type", "unknown provider type")
        if p.max_retries > MAX_RETRIES:
            raise InvalidField(f"{path}.max_retries", f"at most {MAX_RETRIES}")
        base_url = p.base_url or DEFAULT_BASE_URLS[kind]
        _check_url(f"{path}.base_url", base_url)
        # The api_key goes into an upstream header verbatim.
        _check_header_value(f"{path}.api_key", p.api_key)
        out[p.name] = Provider(
            name=p.name,
            type=kind,
            # Route handlers append paths that start with "/", so a trailing one would double.
            base_url=base_url.rstrip("/"),
            api_key=p.api_key,
            send_actor_headers=p.send_actor_headers,
            max_retries=p.max_retries,
        )
    return out


def api_keys_from_proto(req: control_pb2.PutApiKeysRequest) -> dict[str, ClientKey]:
    """Validate a PutApiKeys request and return its keys by lower-case sha256."""
    out: dict[str, ClientKey] = {}
    first: dict[str, int] = {}
    for i, k in enumerate(req.api_keys):
        path = f"api_keys[{i}]"
        # Lookups hash the presented key to lower-case hex, so that is the only form that matches.
        digest = k.key_sha256.lower()
        if not _SHA256_HEX.fullmatch(digest):
            raise InvalidField(f"{path}.key_sha256", "must be 64 hex characters (a sha256)")
        if digest in first:
            raise InvalidField(f"{path}.key_sha256", f"duplicate of api_keys[{first[digest]}]")
        if not k.HasField("actor") or not k.actor.id:
            raise InvalidField(f"{path}.actor.id", "required")
        first[digest] = i
        # Metadata is frozen: the snapshot is shared by every request in flight.
        actor = Actor(k.actor.id, k.actor.username, MappingProxyType(dict(k.actor.metadata)))
        out[digest] = ClientKey(k.key_id or digest[:12], digest, actor, _expiry(k, path))
    return out


def mcp_servers_from_proto(req: control_pb2.PutMcpServersRequest) -> dict[str, McpServer]:
    """Validate a PutMcpServers request and return its servers by id."""
    out: dict[str, McpServer] = {}
    for i, s in enumerate(req.servers):
        path = f"servers[{i}]"
        if not s.id:
            raise InvalidField(f"{path}.id", "required")
        # The id becomes part of injected tool names, which providers restrict to this alphabet.
        if not _matches(MCP_SERVER_ID_PATTERN, s.id):
            raise InvalidField(f"{path}.id", f"must match {MCP_SERVER_ID_PATTERN}")
        if s.id in out:
            raise InvalidField(f"{path}.id", f"duplicate server id {s.id!r}")
        _check_url(f"{path}.url", s.url)
        _check_regex(f"{path}.tool_allow_regex", s.tool_allow_regex)
        _check_regex(f"{path}.tool_deny_regex", s.tool_deny_regex)
        for name, value in s.headers.items():
            if not name or not set(name) <= _HEADER_NAME_CHARS:
                raise InvalidField(f"{path}.headers[{name!r}]", "invalid header name")
            _check_header_value(f"{path}.headers[{name!r}]", value)
        headers = MappingProxyType(dict(s.headers))
        out[s.id] = McpServer(s.id, s.url, s.tool_allow_regex, s.tool_deny_regex, headers)
    return out


def mcp_tokens_from_proto(
    req: control_pb2.PutMcpAccessTokensRequest,
) -> dict[tuple[str, str], McpToken]:
    """Validate a PutMcpAccessTokens request and return its tokens by (actor id, server id)."""
    out: dict[tuple[str, str], McpToken] = {}
    first: dict[tuple[str, str], int] = {}
    for i, t in enumerate(req.tokens):
        path = f"tokens[{i}]"
        for name, value in (("actor_id", t.actor_id), ("server_id", t.server_id)):
            if not value:
                raise InvalidField(f"{path}.{name}", "required")
        if not t.token:
            raise InvalidField(f"{path}.token", "required")
        # Sent as "Authorization: Bearer <token>"; never echoed in the error.
        _check_header_value(f"{path}.token", t.token)
        key = (t.actor_id, t.server_id)
        if key in first:
            raise InvalidField(path, f"duplicate of tokens[{first[key]}] (same actor and server)")
        first[key] = i
        out[key] = McpToken(t.actor_id, t.server_id, t.token, _expiry(t, path))
    return out


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
        extra={str(k): int(v) for k, v in extra.items() if isinstance(v, int | float)},
    )


def record_to_proto(rec: SpooledRecord) -> control_pb2.UsageRecord:
    """The ``UsageRecord`` for a spooled record; ValueError for an unknown kind."""
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
                )
            )
        case "model_thought":
            fields = {k: _str(p, k) for k in ("msg_id", "content", "source")}
            out.model_thought.CopyFrom(control_pb2.ModelThought(**fields))
        case _:
            raise ValueError(f"unknown record kind {rec.kind!r}")
    return out
