"""Unit tests for control.convert: proto <-> domain mapping and push validation."""

from __future__ import annotations

from types import MappingProxyType

import orjson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from control.convert import (
    InvalidField,
    api_keys_from_proto,
    duration,
    mcp_servers_from_proto,
    mcp_tokens_from_proto,
    providers_from_proto,
    record_to_proto,
    timestamp,
)
from control.spool import SpooledRecord
from control.v1 import control_pb2 as pb
from gateway.config import DEFAULT_BASE_URLS
from gateway.records import (
    InterceptionEnded,
    InterceptionStarted,
    ModelThought,
    PromptUsage,
    Record,
    TokenUsage,
    ToolUsage,
)
from gateway.state import Actor, ClientKey, McpServer, McpToken, Provider

HASH_A = "a" * 64
HASH_B = "0123456789abcdef" * 4
ANTHROPIC = pb.PROVIDER_TYPE_ANTHROPIC
OPENAI = pb.PROVIDER_TYPE_OPENAI


def _invalid(exc: pytest.ExceptionInfo[InvalidField], field: str, reason_part: str) -> None:
    assert exc.value.field == field
    assert reason_part in exc.value.reason
    assert str(exc.value) == f"{field}: {exc.value.reason}"


# -- helpers ----------------------------------------------------------------------------------


def test_timestamp_keeps_microseconds() -> None:
    ts = timestamp(1_700_000_000.123456)
    assert ts.seconds == 1_700_000_000
    assert ts.nanos == 123_456_000
    assert ts.ToMicroseconds() == 1_700_000_000_123_456


def test_timestamp_whole_and_negative() -> None:
    assert timestamp(5.0) == Timestamp(seconds=5, nanos=0)
    # Before the epoch, nanos stay non-negative and seconds go down (the Timestamp spec).
    assert timestamp(-1.25) == Timestamp(seconds=-2, nanos=750_000_000)


def test_duration() -> None:
    d = duration(90.5)
    assert (d.seconds, d.nanos) == (90, 500_000_000)
    assert duration(0.0).ToNanoseconds() == 0
    neg = duration(-1.5)
    assert (neg.seconds, neg.nanos) == (-1, -500_000_000)


# -- providers --------------------------------------------------------------------------------


def test_providers_ok() -> None:
    req = pb.PutProvidersRequest(
        config_version=3,
        providers=[
            pb.Provider(name="anthropic", type=ANTHROPIC, api_key="sk-ant", max_retries=10),
            pb.Provider(
                name="openai-eu",
                type=OPENAI,
                base_url="https://eu.example.com/v1/",
                api_key="sk-oa",
                send_actor_headers=True,
            ),
            pb.Provider(name="oai", type=OPENAI),
        ],
    )
    got = providers_from_proto(req)
    assert list(got) == ["anthropic", "openai-eu", "oai"]
    assert got["anthropic"] == Provider(
        "anthropic", "anthropic", DEFAULT_BASE_URLS["anthropic"], "sk-ant", False, 10
    )
    assert got["openai-eu"] == Provider(
        "openai-eu", "openai", "https://eu.example.com/v1", "sk-oa", True
    )
    assert got["oai"].base_url == DEFAULT_BASE_URLS["openai"]
    assert got["oai"].api_key == ""


def test_providers_empty() -> None:
    assert providers_from_proto(pb.PutProvidersRequest()) == {}


@pytest.mark.parametrize(
    ("provider", "field", "reason"),
    [
        (pb.Provider(name="", type=ANTHROPIC), "name", "must match ^[a-z0-9]+(-[a-z0-9]+)*$"),
        (pb.Provider(name="Bad", type=ANTHROPIC), "name", "must match"),
        (pb.Provider(name="a--b", type=ANTHROPIC), "name", "must match"),
        (pb.Provider(name="abc\n", type=ANTHROPIC), "name", "must match"),
        (pb.Provider(name="x", type=pb.PROVIDER_TYPE_UNSPECIFIED), "type", "unknown provider type"),
        (pb.Provider(name="x", type=ANTHROPIC, max_retries=11), "max_retries", "at most 10"),
        (pb.Provider(name="x", type=ANTHROPIC, base_url="ftp://h/"), "base_url", "malformed URL"),
        (pb.Provider(name="x", type=ANTHROPIC, base_url="https://"), "base_url", "malformed URL"),
        (pb.Provider(name="x", type=ANTHROPIC, base_url="api.x.com"), "base_url", "malformed URL"),
        (pb.Provider(name="x", type=ANTHROPIC, base_url="https://a b/"), "base_url", "malformed"),
        (pb.Provider(name="x", type=ANTHROPIC, base_url="https://h\n/"), "base_url", "malformed"),
        (pb.Provider(name="x", type=ANTHROPIC, base_url="http://[::1"), "base_url", "malformed"),
        (pb.Provider(name="x", type=ANTHROPIC, base_url="http://h:99999"), "base_url", "malformed"),
        (pb.Provider(name="x", type=ANTHROPIC, api_key="k\r\nX: y"), "api_key", "CR, LF"),
    ],
)
def test_providers_invalid(provider: pb.Provider, field: str, reason: str) -> None:
    ok = pb.Provider(name="ok", type=OPENAI)
    req = pb.PutProvidersRequest(providers=[ok, provider])
    with pytest.raises(InvalidField) as exc:
        providers_from_proto(req)
    _invalid(exc, f"providers[1].{field}", reason)


def test_providers_unknown_enum_value() -> None:
    # A host built from a newer proto may send a value this daemon does not know.
    req = pb.PutProvidersRequest(
        providers=[pb.Provider(name="x", type=pb.ProviderType.ValueType(7))]
    )
    with pytest.raises(InvalidField, match=r"^providers\[0\]\.type: unknown provider type$"):
        providers_from_proto(req)


def test_providers_duplicate_name() -> None:
    req = pb.PutProvidersRequest(
        providers=[
            pb.Provider(name="x", type=ANTHROPIC),
            pb.Provider(name="y", type=OPENAI),
            pb.Provider(name="x", type=OPENAI),
        ]
    )
    with pytest.raises(InvalidField) as exc:
        providers_from_proto(req)
    assert str(exc.value) == "providers[2].name: duplicate provider name 'x'"


def test_malformed_url_is_not_echoed() -> None:
    req = pb.PutProvidersRequest(
        providers=[pb.Provider(name="x", type=ANTHROPIC, base_url="ftp://user:s3cret@h/")]
    )
    with pytest.raises(InvalidField) as exc:
        providers_from_proto(req)
    assert "s3cret" not in str(exc.value)


# -- api keys ---------------------------------------------------------------------------------


def test_api_keys_ok() -> None:
    expiry = Timestamp(seconds=1_800_000_000, nanos=500_000_000)
    req = pb.PutApiKeysRequest(
        config_version=1,
        api_keys=[
            pb.ApiKey(
                key_id="k-1",
                key_sha256=HASH_B.upper(),
                actor=pb.Actor(id="u-1", username="alice", metadata={"team": "core"}),
                expires_at=expiry,
            ),
            pb.ApiKey(key_sha256=HASH_A, actor=pb.Actor(id="u-2")),
        ],
    )
    got = api_keys_from_proto(req)
    assert list(got) == [HASH_B, HASH_A]
    assert got[HASH_B] == ClientKey(
        "k-1", HASH_B, Actor("u-1", "alice", {"team": "core"}), 1_800_000_000.5
    )
    assert isinstance(got[HASH_B].actor.metadata, MappingProxyType)
    assert got[HASH_A] == ClientKey(HASH_A[:12], HASH_A, Actor("u-2", "", {}), None)


def test_api_key_expiry_at_epoch_zero_is_set() -> None:
    # Presence decides, not value: an explicit zero Timestamp is an expiry long past.
    key = pb.ApiKey(key_sha256=HASH_A, actor=pb.Actor(id="u"), expires_at=Timestamp())
    got = api_keys_from_proto(pb.PutApiKeysRequest(api_keys=[key]))
    assert got[HASH_A].expires_at == 0.0


@pytest.mark.parametrize(
    ("key", "field", "reason"),
    [
        (pb.ApiKey(key_sha256="", actor=pb.Actor(id="u")), "key_sha256", "64 hex"),
        (pb.ApiKey(key_sha256="a" * 63, actor=pb.Actor(id="u")), "key_sha256", "64 hex"),
        (pb.ApiKey(key_sha256="g" * 64, actor=pb.Actor(id="u")), "key_sha256", "64 hex"),
        (pb.ApiKey(key_sha256="a" * 64 + "\n", actor=pb.Actor(id="u")), "key_sha256", "64 hex"),
        (pb.ApiKey(key_sha256=HASH_B), "actor.id", "required"),
        (pb.ApiKey(key_sha256=HASH_B, actor=pb.Actor(username="x")), "actor.id", "required"),
        (
            pb.ApiKey(
                key_sha256=HASH_B,
                actor=pb.Actor(id="u"),
                expires_at=Timestamp(seconds=1, nanos=1_000_000_000),
            ),
            "expires_at",
            "nanos",
        ),
    ],
)
def test_api_keys_invalid(key: pb.ApiKey, field: str, reason: str) -> None:
    ok = pb.ApiKey(key_sha256=HASH_A, actor=pb.Actor(id="u"))
    with pytest.raises(InvalidField) as exc:
        api_keys_from_proto(pb.PutApiKeysRequest(api_keys=[ok, key]))
    _invalid(exc, f"api_keys[1].{field}", reason)


def test_api_keys_duplicate_hash_any_case() -> None:
    req = pb.PutApiKeysRequest(
        api_keys=[
            pb.ApiKey(key_sha256=HASH_B, actor=pb.Actor(id="u")),
            pb.ApiKey(key_sha256=HASH_B.upper(), actor=pb.Actor(id="v")),
        ]
    )
    with pytest.raises(InvalidField) as exc:
        api_keys_from_proto(req)
    _invalid(exc, "api_keys[1].key_sha256", "duplicate of api_keys[0]")


# -- MCP servers ------------------------------------------------------------------------------


def test_mcp_servers_ok() -> None:
    req = pb.PutMcpServersRequest(
        servers=[
            pb.McpServer(
                id="git_hub-1",
                url="https://mcp.example.com/mcp/",
                tool_allow_regex="^get_",
                tool_deny_regex="delete|drop",
                headers={"X-Api-Key": "secret"},
            ),
            pb.McpServer(id="local", url="http://127.0.0.1:9000/mcp"),
        ]
    )
    got = mcp_servers_from_proto(req)
    assert got["git_hub-1"] == McpServer(
        "git_hub-1", "https://mcp.example.com/mcp/", "^get_", "delete|drop", {"X-Api-Key": "secret"}
    )
    assert isinstance(got["git_hub-1"].headers, MappingProxyType)
    assert got["local"] == McpServer("local", "http://127.0.0.1:9000/mcp")


@pytest.mark.parametrize(
    ("server", "field", "reason"),
    [
        (pb.McpServer(url="https://h/"), "id", "required"),
        (pb.McpServer(id="a.b", url="https://h/"), "id", "must match ^[A-Za-z0-9_-]+$"),
        (pb.McpServer(id="a\n", url="https://h/"), "id", "must match"),
        (pb.McpServer(id="s"), "url", "required"),
        (pb.McpServer(id="s", url="ws://h/"), "url", "malformed URL"),
        (pb.McpServer(id="s", url="https:///x"), "url", "malformed URL"),
        (pb.McpServer(id="s", url="https://h/", tool_allow_regex="("), "tool_allow_regex", ""),
        (pb.McpServer(id="s", url="https://h/", headers={"a b": "v"}), "headers['a b']", "name"),
        (pb.McpServer(id="s", url="https://h/", headers={"A": "v\r\n"}), "headers['A']", "CR"),
    ],
)
def test_mcp_servers_invalid(server: pb.McpServer, field: str, reason: str) -> None:
    ok = pb.McpServer(id="ok", url="https://ok/")
    with pytest.raises(InvalidField) as exc:
        mcp_servers_from_proto(pb.PutMcpServersRequest(servers=[ok, server]))
    _invalid(exc, f"servers[1].{field}", reason)


def test_mcp_servers_invalid_regex_message() -> None:
    req = pb.PutMcpServersRequest(
        servers=[pb.McpServer(id="s", url="https://h/", tool_deny_regex="[a-")]
    )
    with pytest.raises(InvalidField) as exc:
        mcp_servers_from_proto(req)
    assert str(exc.value).startswith("servers[0].tool_deny_regex: invalid regex: ")
    assert "unterminated character set" in str(exc.value)


def test_mcp_servers_duplicate_id() -> None:
    req = pb.PutMcpServersRequest(
        servers=[pb.McpServer(id="s", url="https://a/"), pb.McpServer(id="s", url="https://b/")]
    )
    with pytest.raises(InvalidField) as exc:
        mcp_servers_from_proto(req)
    assert str(exc.value) == "servers[1].id: duplicate server id 's'"


# -- MCP tokens -------------------------------------------------------------------------------


def test_mcp_tokens_ok() -> None:
    req = pb.PutMcpAccessTokensRequest(
        tokens=[
            pb.McpAccessToken(actor_id="u-1", server_id="gh", token="t1"),
            pb.McpAccessToken(
                actor_id="u-1",
                server_id="jira",
                token="t2",
                expires_at=Timestamp(seconds=1_900_000_000, nanos=250_000_000),
            ),
            pb.McpAccessToken(actor_id="u-2", server_id="gh", token="t3"),
        ]
    )
    got = mcp_tokens_from_proto(req)
    assert got == {
        ("u-1", "gh"): McpToken("u-1", "gh", "t1", None),
        ("u-1", "jira"): McpToken("u-1", "jira", "t2", 1_900_000_000.25),
        ("u-2", "gh"): McpToken("u-2", "gh", "t3", None),
    }


@pytest.mark.parametrize(
    ("token", "field", "reason"),
    [
        (pb.McpAccessToken(server_id="s", token="t"), "tokens[1].actor_id", "required"),
        (pb.McpAccessToken(actor_id="a", token="t"), "tokens[1].server_id", "required"),
        (pb.McpAccessToken(actor_id="a", server_id="s"), "tokens[1].token", "required"),
        (pb.McpAccessToken(actor_id="a", server_id="s", token="t\n"), "tokens[1].token", "LF"),
        (pb.McpAccessToken(actor_id="u", server_id="s", token="x"), "tokens[1]", "duplicate"),
    ],
)
def test_mcp_tokens_invalid(token: pb.McpAccessToken, field: str, reason: str) -> None:
    ok = pb.McpAccessToken(actor_id="u", server_id="s", token="t")
    with pytest.raises(InvalidField) as exc:
        mcp_tokens_from_proto(pb.PutMcpAccessTokensRequest(tokens=[ok, token]))
    _invalid(exc, field, reason)


def test_mcp_token_secret_not_in_error() -> None:
    bad = pb.McpAccessToken(actor_id="a", server_id="s", token="s3cret\r\n")
    with pytest.raises(InvalidField) as exc:
        mcp_tokens_from_proto(pb.PutMcpAccessTokensRequest(tokens=[bad]))
    assert "s3cret" not in str(exc.value)


# -- usage records ----------------------------------------------------------------------------

CREATED = 1_700_000_000.123456


def _spooled(record: Record, seq: int = 7) -> SpooledRecord:
    payload = orjson.loads(orjson.dumps(record))
    return SpooledRecord(seq, f"rid-{seq}", record.kind, record.interception_id, CREATED, payload)


def _envelope(out: pb.UsageRecord, kind: str) -> None:
    assert out.seq == 7
    assert out.record_id == "rid-7"
    assert out.interception_id == "intc-1"
    assert out.created_at.ToMicroseconds() == 1_700_000_000_123_456
    assert out.WhichOneof("record") == kind


def _started(**overrides: object) -> InterceptionStarted:
    fields: dict[str, object] = {
        "interception_id": "intc-1",
        "provider": "anthropic",
        "provider_name": "anthropic-eu",
        "model": "claude-sonnet-4-5",
        "actor_id": "u-1",
        "username": "alice",
        "actor_metadata": {"team": "core"},
        "client": "Claude Code",
        "user_agent": "claude-cli/2.0",
        "client_session_id": "sess-1",
        "correlating_tool_call_id": "toolu_1",
        "credential_kind": "byok",
        "credential_hint": "sk-a...mnop",
        "streaming": True,
    }
    fields.update(overrides)
    return InterceptionStarted(**fields)  # type: ignore[arg-type]


def test_record_interception_started() -> None:
    out = record_to_proto(_spooled(_started()))
    _envelope(out, "interception_started")
    s = out.interception_started
    assert (s.provider, s.provider_name, s.model) == (
        "anthropic",
        "anthropic-eu",
        "claude-sonnet-4-5",
    )
    assert (s.actor.id, s.actor.username, dict(s.actor.metadata)) == (
        "u-1",
        "alice",
        {"team": "core"},
    )
    assert (s.client, s.user_agent) == ("Claude Code", "claude-cli/2.0")
    assert s.HasField("client_session_id") and s.client_session_id == "sess-1"
    assert s.HasField("correlating_tool_call_id") and s.correlating_tool_call_id == "toolu_1"
    assert s.credential_kind == pb.CREDENTIAL_KIND_BYOK
    assert s.credential_hint == "sk-a...mnop"
    assert s.streaming is True


def test_record_interception_started_optionals_unset() -> None:
    record = _started(
        client_session_id=None,
        correlating_tool_call_id=None,
        credential_kind="centralized",
        streaming=False,
    )
    s = record_to_proto(_spooled(record)).interception_started
    assert not s.HasField("client_session_id")
    assert not s.HasField("correlating_tool_call_id")
    assert s.credential_kind == pb.CREDENTIAL_KIND_CENTRALIZED
    assert s.streaming is False


def test_record_interception_started_empty_string_optional_is_set() -> None:
    s = record_to_proto(_spooled(_started(client_session_id=""))).interception_started
    assert s.HasField("client_session_id") and s.client_session_id == ""


def test_record_interception_ended() -> None:
    record = InterceptionEnded("intc-1", "failed", "overloaded_error", "Overloaded", 529)
    out = record_to_proto(_spooled(record))
    _envelope(out, "interception_ended")
    e = out.interception_ended
    assert (e.status, e.error_type, e.error_message, e.upstream_status) == (
        "failed",
        "overloaded_error",
        "Overloaded",
        529,
    )


def test_record_token_usage() -> None:
    record = TokenUsage(
        "intc-1", "msg_1", 10, 20, 30, 40, 15, 25, {"web_search_requests": 2}, reasoning=7
    )
    out = record_to_proto(_spooled(record))
    _envelope(out, "token_usage")
    t = out.token_usage
    assert t.msg_id == "msg_1"
    assert (t.input_tokens, t.output_tokens, t.reasoning_output_tokens) == (10, 20, 7)
    assert (t.cache_read_input_tokens, t.cache_write_input_tokens) == (30, 40)
    assert (t.cache_write_5m_input_tokens, t.cache_write_1h_input_tokens) == (15, 25)
    assert dict(t.extra) == {"web_search_requests": 2}


def test_record_prompt_usage() -> None:
    out = record_to_proto(_spooled(PromptUsage("intc-1", "msg_1", "hello — ünïcode ✓")))
    _envelope(out, "prompt_usage")
    assert (out.prompt_usage.msg_id, out.prompt_usage.prompt) == ("msg_1", "hello — ünïcode ✓")


def test_record_prompt_usage_all_defaults_still_sets_oneof() -> None:
    out = record_to_proto(_spooled(PromptUsage("intc-1", "", "")))
    assert out.WhichOneof("record") == "prompt_usage"


def test_record_tool_usage() -> None:
    record = ToolUsage(
        "intc-1", "msg_1", "search", "toolu_9", '{"q": 1}', True, "https://mcp/", "boom"
    )
    out = record_to_proto(_spooled(record))
    _envelope(out, "tool_usage")
    t = out.tool_usage
    assert (t.msg_id, t.tool, t.tool_call_id, t.input) == ("msg_1", "search", "toolu_9", '{"q": 1}')
    assert (t.injected, t.server_url, t.invocation_error) == (True, "https://mcp/", "boom")


def test_record_model_thought() -> None:
    out = record_to_proto(_spooled(ModelThought("intc-1", "msg_1", "hmm", "reasoning_summary")))
    _envelope(out, "model_thought")
    m = out.model_thought
    assert (m.msg_id, m.content, m.source) == ("msg_1", "hmm", "reasoning_summary")


def test_record_old_payload_missing_fields() -> None:
    # A spool written before a field existed: every absent field takes its default.
    for kind in (
        "interception_started",
        "interception_ended",
        "token_usage",
        "prompt_usage",
        "tool_usage",
        "model_thought",
    ):
        rec = SpooledRecord(1, "r", kind, "i", CREATED, {"kind": kind})
        out = record_to_proto(rec)
        assert out.WhichOneof("record") == kind
    started = record_to_proto(
        SpooledRecord(1, "r", "interception_started", "i", CREATED, {})
    ).interception_started
    assert not started.HasField("client_session_id")
    assert started.credential_kind == pb.CREDENTIAL_KIND_UNSPECIFIED
    usage = record_to_proto(SpooledRecord(1, "r", "token_usage", "i", CREATED, {})).token_usage
    assert usage.cache_write_1h_input_tokens == 0 and dict(usage.extra) == {}


def test_record_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown record kind 'mystery'"):
        record_to_proto(SpooledRecord(1, "r", "mystery", "i", CREATED, {}))
