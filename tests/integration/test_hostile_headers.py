"""Header values whose bytes are not UTF-8, sent over a raw socket (client libraries refuse to).

aiohttp hands such values over as strings with lone surrogates. A credential made of them is
refused (401, Anthropic's shape) before anything reaches the provider; a ``User-Agent`` or session
header made of them does not stop a valid request, and its records are stored with U+FFFD where
the bad bytes were. Either way nothing is logged at ERROR (anyone could flood the log).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from gateway.records import InterceptionStarted, TokenUsage
from gateway.testing import Reply, load_txtar
from tests.conftest import FIXTURES, GATEWAY_KEY, Gateway, GatewayFactory, by_kind
from tests.raw_http import (
    assert_anthropic_error,
    assert_no_errors_logged,
    chunk,
    chunked_head,
    exchange,
    parse_response,
    request_bytes,
)

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
BODY = json.dumps(
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    }
).encode()
JSON = (b"content-type", b"application/json")
KEY = (b"x-api-key", GATEWAY_KEY.encode())
BAD = b"\xff\xfe"

ROUTES = [("POST", "/anthropic/v1/messages", BODY), ("GET", "/anthropic/v1/models", b"")]
BAD_CREDENTIALS = [
    (b"x-api-key", b"gw-alice-" + BAD),
    (b"authorization", b"Bearer gw-alice-" + BAD),
]


@pytest.mark.parametrize(("method", "target", "body"), ROUTES)
@pytest.mark.parametrize(("name", "value"), BAD_CREDENTIALS)
async def test_credential_not_utf8_is_401(
    gateway: Gateway,
    caplog: pytest.LogCaptureFixture,
    method: str,
    target: str,
    body: bytes,
    name: bytes,
    value: bytes,
) -> None:
    response = await exchange(
        gateway.daemon.port, request_bytes(method, target, [(name, value), JSON], body)
    )

    message = assert_anthropic_error(response, 401, "authentication_error")
    assert message == "invalid gateway API key"
    assert gateway.upstream.requests == []
    assert await gateway.records() == []
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize(("method", "target", "body"), ROUTES)
@pytest.mark.parametrize(("name", "value"), BAD_CREDENTIALS)
async def test_personal_mode_key_not_utf8_is_401(
    make_gateway: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
    method: str,
    target: str,
    body: bytes,
    name: bytes,
    value: bytes,
) -> None:
    gw = await make_gateway(api_keys=[])  # no gateway keys: the client's own key goes upstream
    assert gw.daemon.state.current.personal_mode

    response = await exchange(gw.daemon.port, request_bytes(method, target, [(name, value)], body))

    message = assert_anthropic_error(response, 401, "authentication_error")
    assert "UTF-8" in message
    assert gw.upstream.requests == []
    assert await gw.records() == []
    assert_no_errors_logged(caplog)


async def test_own_provider_key_not_utf8_is_401(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    byok = (b"x-aibridged-provider-key", b"sk-ant-own-" + BAD)
    request = request_bytes("POST", "/anthropic/v1/messages", [KEY, byok, JSON], BODY)

    response = await exchange(gateway.daemon.port, request)

    message = assert_anthropic_error(response, 401, "authentication_error")
    assert "x-aibridged-provider-key" in message
    assert gateway.upstream.requests == []
    assert_no_errors_logged(caplog)


# (User-Agent, the session header that client sends, client name as recorded)
ODD_CLIENTS = [
    (b"claude-cli/2.0.67 (external, " + BAD + b")", b"x-claude-code-session-id", "Claude Code"),
    (b"codex_cli_rs/0.50.0 " + BAD, b"session_id", "Codex"),
]


@pytest.mark.parametrize(("user_agent", "session_header", "client"), ODD_CLIENTS)
async def test_odd_user_agent_and_session_are_served_and_recorded(
    gateway: Gateway,
    caplog: pytest.LogCaptureFixture,
    user_agent: bytes,
    session_header: bytes,
    client: str,
) -> None:
    gateway.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
    headers = [KEY, JSON, (b"user-agent", user_agent), (session_header, b"sess-" + BAD + b"-1")]

    response = await exchange(
        gateway.daemon.port, request_bytes("POST", "/anthropic/v1/messages", headers, BODY)
    )

    assert response.status == 200, response
    assert response.json()["type"] == "message"
    (sent,) = gateway.upstream.requests
    assert sent.headers["User-Agent"].startswith(user_agent[:10].decode())
    records = await gateway.records()
    (started,) = by_kind(records, "interception_started")
    assert started["user_agent"] == user_agent.decode("utf-8", "replace")
    assert "\ufffd\ufffd" in started["user_agent"]
    assert started["client"] == client
    assert started["client_session_id"] == "sess-\ufffd\ufffd-1"
    (ended,) = by_kind(records, "interception_ended")
    assert ended["status"] == "completed"
    assert_no_errors_logged(caplog)


async def test_odd_user_agent_on_passthrough_is_relayed(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    models = b'{"data": [], "has_more": false}'
    gateway.upstream.enqueue(Reply(headers={"Content-Type": "application/json"}, body=models))
    user_agent = b"claude-cli/2.0.67 " + BAD

    response = await exchange(
        gateway.daemon.port,
        request_bytes("GET", "/anthropic/v1/models", [KEY, (b"user-agent", user_agent)]),
    )

    assert response.status == 200, response
    assert response.body == models
    (sent,) = gateway.upstream.requests
    assert sent.headers["User-Agent"].startswith("claude-cli/2.0.67")
    assert_no_errors_logged(caplog)


async def test_spool_stores_records_orjson_refuses(gateway: Gateway) -> None:
    # Lone surrogates of both kinds (from surrogateescape, and not) and integers past 64 bits.
    started = InterceptionStarted(
        interception_id="icpt-odd",
        provider="anthropic",
        provider_name="anthropic",
        model="claude-sonnet-4-5",
        actor_id="u-1",
        username="al\udcffice\ud800",
        actor_metadata={"te\udcfeam": "co\udcffre"},
        client="Unknown",
        user_agent="ua",
        client_session_id=None,
        correlating_tool_call_id=None,
        credential_kind="centralized",
        credential_hint="...",
        streaming=False,
    )
    usage = TokenUsage(interception_id="icpt-odd", msg_id="msg_1", input=2**70, output=-(2**70))
    spool = gateway.daemon.spool

    spool.submit(started)
    spool.submit(usage)

    records = await gateway.records()
    (stored,) = by_kind(records, "interception_started")
    assert stored["username"] == "al\ufffdice\ufffd"
    assert stored["actor_metadata"] == {"te\ufffdam": "co\ufffdre"}
    assert stored["interception_id"] == "icpt-odd"
    assert stored["streaming"] is False
    (tokens,) = by_kind(records, "token_usage")
    assert (tokens["input"], tokens["output"]) == (2**63 - 1, -(2**63))


MALFORMED = [
    b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: a\x00b\r\n\r\n",
    b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
    b"\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"GET /anthropic/v1/models HTTP/1.1\r\nHost: gw\r\nbad header name: 1\r\n\r\n",
]


@pytest.mark.parametrize("request_", MALFORMED, ids=["nul-in-value", "bad-chunk", "bad-name"])
async def test_request_the_server_cannot_parse_is_400_in_anthropic_shape(
    gateway: Gateway, caplog: pytest.LogCaptureFixture, request_: bytes
) -> None:
    response = await exchange(gateway.daemon.port, request_)

    message = assert_anthropic_error(response, 400, "invalid_request_error")
    assert message.startswith("malformed HTTP request")
    assert gateway.upstream.requests == []
    assert_no_errors_logged(caplog)


# A chunked body that goes bad once the handler is reading it: the parser's error must reach the
# handler at once (a prompt 400), not after client_body_timeout as a 408.
BAD_CHUNK = b"zz\r\nabc\r\n0\r\n\r\n"
BAD_BODIES = {
    "after-a-good-chunk": [chunk(BODY[:5]), BAD_CHUNK],
    "first-chunk": [BAD_CHUNK],
    "chunk-longer-than-its-size": [chunk(BODY[:5]), b"3\r\nabcdef\r\n"],
}
CHUNKED_TARGETS = ["/anthropic/v1/messages", "/anthropic/v1/messages/count_tokens"]
# Far below the body timeout (30 s) and aiohttp's lingering read (10 s); far above a prompt answer.
PROMPT = 6.0


async def send_in_pieces(port: int, pieces: list[bytes]) -> tuple[float, bytes]:
    """Write ``pieces`` a moment apart; seconds from the last one until the server closed, and
    everything it sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await asyncio.sleep(0.2)  # the handler is waiting for more of the body by now
        start = time.monotonic()
        async with asyncio.timeout(PROMPT):
            data = await reader.read()
        return time.monotonic() - start, data
    finally:
        writer.close()


@pytest.mark.parametrize("target", CHUNKED_TARGETS)
@pytest.mark.parametrize("pieces", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_chunked_body_going_bad_is_a_prompt_400(
    make_gateway: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
    target: str,
    pieces: list[bytes],
) -> None:
    gw = await make_gateway(client_body_timeout=30)

    _, data = await send_in_pieces(gw.daemon.port, [chunked_head(target, [KEY, JSON]), *pieces])

    response, rest = parse_response(data)
    message = assert_anthropic_error(response, 400, "invalid_request_error")
    assert message.startswith("malformed HTTP request"), message
    assert response.headers["connection"] == "close"
    assert rest == b""
    assert gw.upstream.requests == []
    assert await gw.records() == []
    assert_no_errors_logged(caplog)


async def test_chunked_body_going_bad_after_an_early_answer_closes_promptly(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    # Answered (401) before its body was read: aiohttp goes on reading the body for a while
    # (lingering), and must neither log the bad chunk as an error nor wait for more.
    head = chunked_head("/anthropic/v1/messages", [(b"x-api-key", b"gw-nobody"), JSON])

    elapsed, data = await send_in_pieces(gateway.daemon.port, [head, chunk(BODY[:5]), BAD_CHUNK])

    response, _ = parse_response(data)
    assert_anthropic_error(response, 401, "authentication_error")
    assert elapsed < PROMPT
    assert gateway.upstream.requests == []
    assert_no_errors_logged(caplog)


async def test_chunked_body_sent_in_pieces_is_served(gateway: Gateway) -> None:
    gateway.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
    head = chunked_head("/anthropic/v1/messages", [KEY, JSON, (b"connection", b"close")])
    pieces = [chunk(BODY[i : i + 20]) for i in range(0, len(BODY), 20)]

    _, data = await send_in_pieces(gateway.daemon.port, [head, *pieces, chunk(b"")])

    response, _ = parse_response(data)
    assert response.status == 200, response
    assert response.json()["type"] == "message"
    assert gateway.upstream.requests[0].body == BODY
