"""One validator for the state, whether it comes from the YAML file or from a host's push.

Before, the gRPC path refused an invalid MCP regex (and malformed URLs, header injection,
duplicate ids, ...) while the YAML path accepted it, and every request then failed with 500.
Each case here goes both ways and must be refused by both with the same field and reason, the
data plane still answering 200 after the refused push.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import pytest

from control.v1 import control_pb2 as pb
from control.v1.control_pb2_grpc import ControlServiceStub
from gateway.config import ConfigError, load_settings
from gateway.state import Snapshot
from gateway.testing import Reply, load_txtar
from tests.conftest import CONTROL_METADATA, FIXTURES, GATEWAY_KEY, Gateway

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
MCP: dict[str, Any] = {"id": "tools", "url": "http://127.0.0.1:9/mcp"}

MCP_CASES = [
    pytest.param({**MCP, "tool_allow_regex": "("}, "tool_allow_regex", id="allow-regex"),
    pytest.param({**MCP, "tool_deny_regex": "[a-"}, "tool_deny_regex", id="deny-regex"),
    pytest.param({**MCP, "id": "a.b"}, "id", id="id-alphabet"),
    pytest.param({**MCP, "id": ""}, "id", id="id-empty"),
    pytest.param({**MCP, "url": "ws://h/mcp"}, "url", id="url-scheme"),
    pytest.param({**MCP, "url": "http://h:99999/"}, "url", id="url-port"),
    pytest.param({**MCP, "headers": {"a b": "v"}}, "headers['a b']", id="header-name"),
    pytest.param({**MCP, "headers": {"X-K": "v\r\nX-Evil: 1"}}, "headers['X-K']", id="header-crlf"),
]
PROVIDER_CASES = [
    pytest.param({"name": "Bad_Name"}, "name", id="name"),
    pytest.param({"base_url": "https://a b/"}, "base_url", id="base-url-space"),
    pytest.param({"base_url": "https://"}, "base_url", id="base-url-no-host"),
    pytest.param({"api_key": "sk\r\nX-Evil: 1"}, "api_key", id="api-key-crlf"),
    pytest.param({"max_retries": 11}, "max_retries", id="max-retries"),
]


def yaml_error(**settings: Any) -> str:
    """The message the YAML path refuses ``settings`` with."""
    with pytest.raises(ConfigError) as info:
        Snapshot.from_settings(load_settings(None, **settings), environ={})
    message = str(info.value)
    assert message.startswith("invalid configuration: ")
    return message.removeprefix("invalid configuration: ")


async def push_error(call: Any) -> str:
    """The details of the INVALID_ARGUMENT a push is refused with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.details() or ""


async def assert_serves(gw: Gateway) -> None:
    gw.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gw.url}/v1/messages", data=TEXT["request"], headers={"x-api-key": GATEWAY_KEY}
        ) as resp,
    ):
        assert resp.status == 200


@pytest.mark.parametrize(("server", "field"), MCP_CASES)
async def test_mcp_server_refused_alike_from_yaml_and_push(
    control: tuple[Gateway, ControlServiceStub], server: dict[str, Any], field: str
) -> None:
    gw, stub = control
    from_yaml = yaml_error(mcp_servers=[server])
    push = pb.PutMcpServersRequest(config_version=1, servers=[pb.McpServer(**server)])
    from_push = await push_error(stub.PutMcpServers(push, metadata=CONTROL_METADATA))
    assert from_yaml.startswith(f"mcp_servers[0].{field}: ")
    assert from_push.startswith(f"servers[0].{field}: ")
    assert from_yaml == "mcp_" + from_push  # same rule, same words
    await assert_serves(gw)


@pytest.mark.parametrize(("change", "field"), PROVIDER_CASES)
async def test_provider_refused_alike_from_yaml_and_push(
    control: tuple[Gateway, ControlServiceStub], change: dict[str, Any], field: str
) -> None:
    gw, stub = control
    fields = {"name": "claude", "base_url": "https://api.example.com", "api_key": "sk-1", **change}
    from_yaml = yaml_error(providers=[{**fields, "type": "anthropic"}])
    message = pb.Provider(**fields, type=pb.PROVIDER_TYPE_ANTHROPIC)
    push = pb.PutProvidersRequest(config_version=1, providers=[message])
    from_push = await push_error(stub.PutProviders(push, metadata=CONTROL_METADATA))
    assert from_yaml.startswith(f"providers[0].{field}: ")
    assert from_yaml == from_push
    assert "X-Evil" not in from_yaml  # a value that may be a secret is never echoed
    await assert_serves(gw)


async def test_duplicate_mcp_server_ids_refused_alike(
    control: tuple[Gateway, ControlServiceStub],
) -> None:
    gw, stub = control
    from_yaml = yaml_error(mcp_servers=[MCP, MCP])
    push = pb.PutMcpServersRequest(config_version=1, servers=[pb.McpServer(**MCP)] * 2)
    from_push = await push_error(stub.PutMcpServers(push, metadata=CONTROL_METADATA))
    assert from_yaml == "mcp_" + from_push == "mcp_servers[1].id: duplicate server id 'tools'"
    await assert_serves(gw)


ACTOR_CASES = [
    pytest.param({"actor_id": "u\r\nX-Evil: 1"}, "actor_id", "actor.id", id="actor-id-crlf"),
    pytest.param({"metadata": {"a b": "v"}}, "metadata['a b']", "metadata['a b']", id="meta-name"),
    pytest.param({"metadata": {"t": "x\x01y"}}, "metadata['t']", "metadata['t']", id="meta-ctl"),
]


@pytest.mark.parametrize(("change", "yaml_field", "push_field"), ACTOR_CASES)
async def test_actor_fields_that_go_into_upstream_headers_are_refused_alike(
    control: tuple[Gateway, ControlServiceStub],
    change: dict[str, Any],
    yaml_field: str,
    push_field: str,
) -> None:
    """The actor becomes X-AI-Bridge-Actor-* headers: a value aiohttp refuses would fail every
    request of that actor, so it is refused where the state comes in."""
    gw, stub = control
    key = {"key_sha256": "a" * 64, "actor_id": "u-1", **change}
    from_yaml = yaml_error(api_keys=[key])
    actor = pb.Actor(id=key["actor_id"], metadata=key.get("metadata", {}))
    push = pb.PutApiKeysRequest(
        config_version=1, api_keys=[pb.ApiKey(key_sha256="a" * 64, actor=actor)]
    )
    from_push = await push_error(stub.PutApiKeys(push, metadata=CONTROL_METADATA))
    assert from_yaml.startswith(f"api_keys[0].{yaml_field}: ")
    assert from_push.startswith(f"api_keys[0].{push_field}: ")
    assert "X-Evil" not in from_yaml + from_push
    await assert_serves(gw)
