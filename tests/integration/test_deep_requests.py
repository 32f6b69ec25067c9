"""A request nested deeper than the gateway can re-encode still reaches the provider.

orjson reads 1024 levels of nesting but writes 254: a body between the two parses, and must
not become a 500 when tools would be injected (injecting means writing the body again).
"""

from __future__ import annotations

import aiohttp
import orjson

from gateway.testing import Reply, load_txtar
from tests.conftest import FIXTURES, GATEWAY_KEY, GatewayFactory, by_kind, wait_for_end
from tests.mcp_server import McpTestServer, running_mcp_server

TEXT = FIXTURES / "anthropic" / "text.txtar"


async def test_a_body_too_deep_to_re_encode_goes_as_sent_without_tools(
    make_gateway: GatewayFactory,
) -> None:
    fx = load_txtar(TEXT)
    # Synthetic: the fixture's request plus a field nested 300 levels (past orjson's 254).
    raw = fx["request"].rstrip().removesuffix("}") + ',"extra":' + '{"n":' * 300 + "0" + "}" * 300
    body = (raw + "}").encode()
    assert orjson.loads(body)["extra"]["n"]
    async with running_mcp_server(McpTestServer()) as url:
        gw = await make_gateway(mcp_servers=[{"id": "tools", "url": url}])
        gw.upstream.enqueue(Reply.from_section(fx["non-streaming"]))
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{gw.url}/v1/messages",
                data=body,
                headers={"x-api-key": GATEWAY_KEY, "content-type": "application/json"},
            ) as resp,
        ):
            assert resp.status == 200
            await resp.read()
        ended = await wait_for_end(gw)
    assert ended["status"] == "completed"
    assert gw.upstream.requests[-1].body == body  # as sent: no tools added
    assert by_kind(await gw.records(), "token_usage")
