"""McpPool against real MCP servers over loopback (tests/mcp_server.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from gateway.metrics import REGISTRY
from gateway.state import McpServer, McpToken
from gateway.tools.mcp_pool import McpCallError, McpPool
from tests.mcp_server import FAIL_MESSAGE, McpTestServer, running_mcp_server

TOOLS = {"add", "echo_auth", "echo_header", "fail", "slow"}
PoolFactory = Callable[..., McpPool]


def unavailable(server_id: str) -> float:
    """Current value of the unavailable counter for ``server_id``."""
    value = REGISTRY.get_sample_value(
        "aibridged_mcp_server_unavailable_total", {"mcp_server": server_id}
    )
    return value or 0.0


def pool_tasks() -> list[asyncio.Task[Any]]:
    """Tasks the pool started (owners and listen streams) that are still running."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("mcp-") and not t.done()]


def text(result_content: list[dict[str, Any]]) -> str:
    assert [item["type"] for item in result_content] == ["text"]
    return str(result_content[0]["text"])


@pytest.fixture
def free_port() -> Iterator[int]:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    yield port


@pytest.fixture
def test_server() -> McpTestServer:
    return McpTestServer(page_size=2)


@pytest.fixture
async def mcp_url(test_server: McpTestServer) -> AsyncIterator[str]:
    async with running_mcp_server(test_server) as url:
        yield url


@pytest.fixture
async def make_pool(mcp_url: str) -> AsyncIterator[PoolFactory]:
    """Pools closed at teardown, before the test server stops."""
    pools: list[McpPool] = []

    def make(**kwargs: Any) -> McpPool:
        pool = McpPool(**kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


async def test_list_tools_follows_pages(
    make_pool: PoolFactory, mcp_url: str, test_server: McpTestServer
) -> None:
    pool = make_pool()
    pool.configure({"s1": McpServer("s1", mcp_url)}, {})
    tools = await pool.list_tools("u1")
    assert sorted(t.name for t in tools) == sorted(TOOLS)
    assert test_server.list_calls == 3  # 5 tools, 2 per page
    add = next(t for t in tools if t.name == "add")
    assert (add.server_id, add.server_url, add.description) == ("s1", mcp_url, "Add two integers.")
    assert add.input_schema["properties"].keys() == {"a", "b"}
    assert add.input_schema["required"] == ["a", "b"]


async def test_listing_cached_until_change_event(
    make_pool: PoolFactory, mcp_url: str, test_server: McpTestServer
) -> None:
    pool = make_pool()
    pool.configure({"s1": McpServer("s1", mcp_url)}, {})
    await pool.list_tools("u1")
    calls = test_server.list_calls
    test_server.add_tool(lambda x: x, name="identity")
    assert "identity" not in {t.name for t in await pool.list_tools("u1")}
    assert test_server.list_calls == calls  # served from the cache
    await test_server.notify_tools_changed()
    deadline = time.monotonic() + 3
    while "identity" not in {t.name for t in await pool.list_tools("u1")}:
        assert time.monotonic() < deadline, "the change event did not refresh the listing"
        await asyncio.sleep(0.05)


async def test_listing_refreshed_after_ttl(
    make_pool: PoolFactory, mcp_url: str, test_server: McpTestServer
) -> None:
    pool = make_pool(list_ttl=0.3)
    pool.configure({"s1": McpServer("s1", mcp_url)}, {})
    await pool.list_tools("u1")
    test_server.remove_tool("slow")  # no change event
    assert "slow" in {t.name for t in await pool.list_tools("u1")}
    await asyncio.sleep(0.4)
    assert {t.name for t in await pool.list_tools("u1")} == TOOLS - {"slow"}


async def test_call_returns_content(make_pool: PoolFactory, mcp_url: str) -> None:
    pool = make_pool()
    pool.configure({"s1": McpServer("s1", mcp_url)}, {})
    result = await pool.call("u1", "s1", "add", {"a": 2, "b": 3})
    assert result.is_error is False
    assert result.content == [{"type": "text", "text": "5"}]


async def test_failing_tool_is_error(make_pool: PoolFactory, mcp_url: str) -> None:
    pool = make_pool()
    pool.configure({"s1": McpServer("s1", mcp_url)}, {})
    result = await pool.call("u1", "s1", "fail", {})
    assert result.is_error is True
    assert text(result.content).endswith(FAIL_MESSAGE)


async def test_tokens_and_static_headers(
    make_pool: PoolFactory, mcp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pool = make_pool()
    server = McpServer("s1", mcp_url, headers={"X-Team": "core", "Authorization": "Bearer static"})
    tokens = {
        ("u1", "s1"): McpToken("u1", "s1", "tok-alice-secret"),
        ("u2", "s1"): McpToken("u2", "s1", "tok-bob-secret", expires_at=time.time() + 3600),
        ("u3", "s1"): McpToken("u3", "s1", "tok-expired-secret", expires_at=time.time() - 1),
    }
    pool.configure({"s1": server}, tokens)
    actors = ["u1", "u2", "u3", "u4"]
    auth = await asyncio.gather(*(pool.call(a, "s1", "echo_auth", {}) for a in actors))
    assert [text(r.content) for r in auth] == [
        "Bearer tok-alice-secret",
        "Bearer tok-bob-secret",
        "Bearer static",  # expired token: static headers only
        "Bearer static",  # no token
    ]
    team = await asyncio.gather(
        *(pool.call(a, "s1", "echo_header", {"name": "X-Team"}) for a in actors)
    )
    assert [text(r.content) for r in team] == ["core"] * 4
    # Listing and calling share the actor's connection: one owner task per distinct token.
    await asyncio.gather(*(pool.list_tools(a) for a in actors))
    assert len([t for t in pool_tasks() if t.get_name() == "mcp-connection-s1"]) == 3
    assert "secret" not in caplog.text


async def test_slow_tool_times_out(make_pool: PoolFactory, mcp_url: str) -> None:
    pool = make_pool(call_timeout=0.5)
    pool.configure({"s1": McpServer("s1", mcp_url)}, {})
    start = time.monotonic()
    with pytest.raises(McpCallError, match=r"no result within 0\.5s"):
        await pool.call("u1", "s1", "slow", {"seconds": 5})
    assert time.monotonic() - start < 1.5
    # The connection survives a timed-out call.
    assert text((await pool.call("u1", "s1", "add", {"a": 1, "b": 1})).content) == "2"


async def test_unknown_server(make_pool: PoolFactory) -> None:
    pool = make_pool()
    pool.configure({}, {})
    with pytest.raises(McpCallError, match="unknown MCP server 'nope'"):
        await pool.call("u1", "nope", "add", {"a": 1, "b": 1})


async def test_down_and_hanging_servers_left_out(
    make_pool: PoolFactory, mcp_url: str, free_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as hang:  # accepts connections, never answers
        hang.bind(("127.0.0.1", 0))
        hang.listen(8)
        servers = {
            "up": McpServer("up", mcp_url),
            "down": McpServer("down", f"http://127.0.0.1:{free_port}/mcp"),
            "hang": McpServer("hang", f"http://127.0.0.1:{hang.getsockname()[1]}/mcp"),
        }
        tokens = {("u1", "down"): McpToken("u1", "down", "tok-down-secret")}
        pool = make_pool(list_timeout=0.5)
        pool.configure(servers, tokens)
        before = {sid: unavailable(sid) for sid in servers}
        start = time.monotonic()
        tools = await pool.list_tools("u1")
        assert time.monotonic() - start < 0.5 + 1
        assert {t.server_id for t in tools} == {"up"}
        assert sorted(t.name for t in tools) == sorted(TOOLS)
        assert {sid: unavailable(sid) - before[sid] for sid in servers} == {
            "up": 0,
            "down": 1,
            "hang": 1,
        }
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("MCP server down left out" in m for m in warnings)
        assert any("MCP server hang left out" in m for m in warnings)
        assert "secret" not in caplog.text
        # The hanging connect was abandoned too (not left pending): the next listing is quick.
        await asyncio.sleep(0.05)
        start = time.monotonic()
        assert {t.server_id for t in await pool.list_tools("u1")} == {"up"}
        assert time.monotonic() - start < 0.2


async def test_down_server_backs_off(make_pool: PoolFactory, free_port: int) -> None:
    pool = make_pool(list_timeout=0.5, max_backoff=5)
    pool.configure({"gone": McpServer("gone", f"http://127.0.0.1:{free_port}/mcp")}, {})
    before = unavailable("gone")
    assert await pool.list_tools("u1") == []
    # During the backoff the server is skipped without a new attempt, and calls fail fast.
    start = time.monotonic()
    with pytest.raises(McpCallError, match="'gone' is unavailable \\(next attempt in"):
        await pool.call("u1", "gone", "add", {"a": 1, "b": 1})
    assert await pool.list_tools("u1") == []
    assert time.monotonic() - start < 0.1
    assert unavailable("gone") - before == 2


async def test_reconnects_after_restart(make_pool: PoolFactory, free_port: int) -> None:
    pool = make_pool(max_backoff=0.5, list_ttl=0)
    url = f"http://127.0.0.1:{free_port}/mcp"
    pool.configure({"r": McpServer("r", url)}, {})
    async with running_mcp_server(port=free_port):
        assert text((await pool.call("u1", "r", "add", {"a": 1, "b": 2})).content) == "3"
    with pytest.raises(McpCallError):
        await pool.call("u1", "r", "add", {"a": 1, "b": 2})
    assert await pool.list_tools("u1") == []
    with pytest.raises(McpCallError, match="next attempt in"):
        await pool.call("u1", "r", "add", {"a": 1, "b": 2})  # in backoff now
    async with running_mcp_server(port=free_port):
        deadline = time.monotonic() + 5
        while True:
            try:
                result = await pool.call("u1", "r", "add", {"a": 1, "b": 2})
                break
            except McpCallError:
                assert time.monotonic() < deadline, "no reconnection after the server came back"
                await asyncio.sleep(0.1)
        assert text(result.content) == "3"
        assert {t.name for t in await pool.list_tools("u1")} == TOOLS
        await pool.close()


async def test_configure_stops_stale_connections(make_pool: PoolFactory, mcp_url: str) -> None:
    pool = make_pool()
    token = McpToken("u1", "s1", "tok-1")
    pool.configure({"s1": McpServer("s1", mcp_url)}, {("u1", "s1"): token})
    await pool.call("u1", "s1", "add", {"a": 1, "b": 1})
    await pool.call("u2", "s1", "add", {"a": 1, "b": 1})
    owners = [t for t in pool_tasks() if t.get_name() == "mcp-connection-s1"]
    assert len(owners) == 2

    # Rotating u1's token stops only u1's connection.
    pool.configure({"s1": McpServer("s1", mcp_url)}, {("u1", "s1"): McpToken("u1", "s1", "t2")})
    done, pending = await asyncio.wait(owners, timeout=2, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.sleep(0.1)
    assert len(done) == 1 and len(pending) == 1 and not pending.pop().done()
    echoed = await pool.call("u1", "s1", "echo_auth", {})
    assert text(echoed.content) == "Bearer t2"

    # Removing the server stops every connection to it.
    owners = [t for t in pool_tasks() if t.get_name() == "mcp-connection-s1"]
    pool.configure({}, {})
    _, pending = await asyncio.wait(owners, timeout=2)
    assert not pending
    assert pool_tasks() == []
    with pytest.raises(McpCallError, match="unknown MCP server"):
        await pool.call("u1", "s1", "add", {"a": 1, "b": 1})
    assert await pool.list_tools("u1") == []


async def test_url_change_reconnects(make_pool: PoolFactory, mcp_url: str) -> None:
    pool = make_pool()
    pool.configure({"s1": McpServer("s1", mcp_url)}, {})
    await pool.call("u1", "s1", "add", {"a": 1, "b": 1})
    [owner] = pool_tasks_named("mcp-connection-s1")
    async with running_mcp_server() as other:
        pool.configure({"s1": McpServer("s1", other)}, {})
        await asyncio.wait_for(owner, 2)
        tools = await pool.list_tools("u1")
        assert {t.server_url for t in tools} == {other}
        await pool.close()


def pool_tasks_named(name: str) -> list[asyncio.Task[Any]]:
    return [t for t in pool_tasks() if t.get_name() == name]


async def test_idle_connection_closed(make_pool: PoolFactory, mcp_url: str) -> None:
    pool = make_pool(idle_ttl=0.3)
    pool.configure({"s1": McpServer("s1", mcp_url)}, {})
    await pool.call("u1", "s1", "add", {"a": 1, "b": 1})
    [owner] = pool_tasks_named("mcp-connection-s1")
    await asyncio.wait_for(owner, 2)
    assert pool_tasks() == []
    assert text((await pool.call("u1", "s1", "add", {"a": 2, "b": 2})).content) == "4"


async def test_close_leaves_no_task(make_pool: PoolFactory, mcp_url: str) -> None:
    pool = make_pool()
    tokens = {("u1", "s1"): McpToken("u1", "s1", "tok-1")}
    pool.configure({"s1": McpServer("s1", mcp_url)}, tokens)
    await asyncio.gather(pool.list_tools("u1"), pool.list_tools("u2"))
    await pool.call("u1", "s1", "add", {"a": 1, "b": 1})
    started = pool_tasks()
    assert {t.get_name() for t in started} == {"mcp-connection-s1", "mcp-listen-s1"}
    await pool.close()
    assert all(t.done() for t in started)
    assert pool_tasks() == []
    assert await pool.list_tools("u1") == []
    with pytest.raises(McpCallError):
        await pool.call("u1", "s1", "add", {"a": 1, "b": 1})


async def test_configure_lets_inflight_calls_finish(make_pool: PoolFactory, mcp_url: str) -> None:
    pool = make_pool()
    pool.configure({"s1": McpServer("s1", mcp_url)}, {})
    await pool.call("u1", "s1", "add", {"a": 1, "b": 1})
    [owner] = pool_tasks_named("mcp-connection-s1")
    call = asyncio.create_task(pool.call("u1", "s1", "slow", {"seconds": 0.3}))
    await asyncio.sleep(0.1)
    pool.configure({}, {})
    assert text((await call).content) == "done"
    await asyncio.wait_for(owner, 2)
