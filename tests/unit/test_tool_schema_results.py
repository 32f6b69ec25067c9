"""Anthropic tool definitions, injection into a request and tool-result conversion (pure)."""

from __future__ import annotations

import copy
from typing import Any

import mcp.types as mt
import pytest

from gateway.tools.naming import ToolRef
from gateway.tools.results import anthropic_tool_error, anthropic_tool_result
from gateway.tools.schema import anthropic_tool, inject_anthropic_tools


def ref(schema: dict[str, Any]) -> ToolRef:
    return ToolRef("srv", "http://srv.invalid/mcp", "get_thing", "Gets a thing.", schema)


def test_anthropic_tool_keeps_properties_and_required_only() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"id": {"type": "string"}, "depth": {"type": "integer"}},
        "required": ["id"],
        "additionalProperties": False,
        "$defs": {"x": {}},
    }
    assert anthropic_tool("bmcp_srv_get_thing", ref(schema)) == {
        "name": "bmcp_srv_get_thing",
        "description": "Gets a thing.",
        "input_schema": {
            "type": "object",
            "properties": {"id": {"type": "string"}, "depth": {"type": "integer"}},
            "required": ["id"],
        },
    }


@pytest.mark.parametrize(
    "schema",
    [
        {},
        {"type": "object"},
        {"properties": {}, "required": []},
        {"properties": ["not", "a", "dict"]},
        {"properties": None, "required": "id"},
    ],
)
def test_anthropic_tool_degenerate_schemas(schema: dict[str, Any]) -> None:
    tool = anthropic_tool("t", ref(schema))
    assert tool["input_schema"] == {"type": "object", "properties": {}}


def test_anthropic_tool_does_not_alias_the_catalog_schema() -> None:
    schema: dict[str, Any] = {"properties": {"a": {"type": "string"}}}
    tool = anthropic_tool("t", ref(schema))
    tool["input_schema"]["properties"]["b"] = {}
    assert list(schema["properties"]) == ["a"]


INJECTED = [{"name": "bmcp_a"}, {"name": "bmcp_b"}]


def test_injected_tools_are_prepended_and_cache_breakpoint_stays_last() -> None:
    client = [{"name": "mine"}, {"name": "last", "cache_control": {"type": "ephemeral"}}]
    body: dict[str, Any] = {"model": "m", "tools": client}
    inject_anthropic_tools(body, INJECTED)
    assert [t["name"] for t in body["tools"]] == ["bmcp_a", "bmcp_b", "mine", "last"]
    assert body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert [t.get("cache_control") for t in body["tools"][:-1]] == [None] * 3


def test_missing_tools_are_created() -> None:
    body: dict[str, Any] = {"model": "m"}
    inject_anthropic_tools(body, INJECTED)
    assert body["tools"] == INJECTED
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


def test_no_injected_tools_leaves_body_untouched() -> None:
    body: dict[str, Any] = {"model": "m", "tool_choice": {"type": "any"}}
    inject_anthropic_tools(body, [])
    assert body == {"model": "m", "tool_choice": {"type": "any"}}


AUTO_OFF = {"type": "auto", "disable_parallel_tool_use": True}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, AUTO_OFF),
        ({}, AUTO_OFF),
        ({"type": ""}, AUTO_OFF),
        ({"type": None}, AUTO_OFF),
        ({"disable_parallel_tool_use": False}, AUTO_OFF),
        ({"type": "auto"}, AUTO_OFF),
        ({"type": "auto", "disable_parallel_tool_use": False}, AUTO_OFF),
        ({"type": "any"}, {"type": "any", "disable_parallel_tool_use": True}),
        (
            {"type": "tool", "name": "mine"},
            {"type": "tool", "name": "mine", "disable_parallel_tool_use": True},
        ),
        ({"type": "none"}, {"type": "none"}),
    ],
)
def test_tool_choice_rewrite(choice: Any, expected: dict[str, Any]) -> None:
    body: dict[str, Any] = {"model": "m"}
    if choice is not None:  # None here means "missing"; explicit null is tested below
        body["tool_choice"] = choice
    original = copy.deepcopy(choice)
    inject_anthropic_tools(body, INJECTED)
    assert body["tool_choice"] == expected
    assert choice == original  # the client's dict is replaced, not mutated


def test_explicit_null_tool_choice() -> None:
    body: dict[str, Any] = {"model": "m", "tool_choice": None}
    inject_anthropic_tools(body, INJECTED)
    assert body["tool_choice"] == AUTO_OFF


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tool_choice": "auto"}, "tool_choice must be an object"),
        ({"tool_choice": ["auto"]}, "tool_choice must be an object"),
        ({"tool_choice": {"type": 1}}, "tool_choice.type must be a string"),
        ({"tool_choice": {"type": "sometimes"}}, "unknown tool_choice.type 'sometimes'"),
        ({"tools": {"name": "x"}}, "tools must be an array"),
        ({"tools": "x", "tool_choice": {"type": "auto"}}, "tools must be an array"),
    ],
)
def test_unrewritable_requests_raise_and_stay_untouched(body: dict[str, Any], message: str) -> None:
    body = {"model": "m", "tools": [{"name": "mine"}], **body}
    original = copy.deepcopy(body)
    with pytest.raises(ValueError, match=message):
        inject_anthropic_tools(body, INJECTED)
    assert body == original


def dump(item: mt.ContentBlock) -> dict[str, Any]:
    return item.model_dump(by_alias=True, mode="json", exclude_none=True)


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def convert(*items: dict[str, Any], is_error: bool = False) -> list[dict[str, Any]]:
    result = anthropic_tool_result("toolu_1", items, is_error)
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_1"
    assert result["is_error"] is is_error
    content: list[dict[str, Any]] = result["content"]
    return content


def test_text_content() -> None:
    items = [dump(mt.TextContent(type="text", text="one")), text("two")]
    assert convert(*items) == [text("one"), text("two")]


@pytest.mark.parametrize("mime", ["image/jpeg", "image/png", "image/gif", "image/webp"])
def test_supported_image(mime: str) -> None:
    item = dump(mt.ImageContent(type="image", data="iVBORw0KGgo=", mime_type=mime))
    assert convert(item) == [
        {"type": "image", "source": {"type": "base64", "media_type": mime, "data": "iVBORw0KGgo="}}
    ]


def test_unsupported_image() -> None:
    item = dump(mt.ImageContent(type="image", data="PHN2Zz4=", mime_type="image/svg+xml"))
    assert convert(item) == [text("Unsupported image content (MIME: image/svg+xml)")]


def test_text_resource() -> None:
    resource = mt.TextResourceContents(uri="file:///a.txt", mime_type="text/plain", text="hello")
    item = dump(mt.EmbeddedResource(type="resource", resource=resource))
    assert convert(item) == [text("Resource (MIME: text/plain, URI: file:///a.txt):\nhello")]


def test_text_resource_without_mime() -> None:
    item = {"type": "resource", "resource": {"uri": "mem://x", "text": ""}}
    assert convert(item) == [text("Resource (MIME: unknown, URI: mem://x):\n")]


@pytest.mark.parametrize(("blob", "size"), [("QUJD", 3), ("QUI=", 2), ("QQ==", 1), ("", 0)])
def test_blob_resource_is_described_not_pasted(blob: str, size: int) -> None:
    resource = mt.BlobResourceContents(uri="file:///b.bin", mime_type="application/zip", blob=blob)
    item = dump(mt.EmbeddedResource(type="resource", resource=resource))
    assert convert(item) == [
        text(f"Binary resource (MIME: application/zip, URI: file:///b.bin), {size} bytes base64")
    ]


def test_unknown_resource_kind() -> None:
    assert convert({"type": "resource", "resource": {"uri": "x://y"}}) == [
        text("Unsupported embedded resource (URI: x://y)")
    ]
    assert convert({"type": "resource"}) == [text("Unsupported embedded resource")]


def test_resource_link() -> None:
    bare = dump(mt.ResourceLink(type="resource_link", uri="file:///r", name=""))
    full = dump(
        mt.ResourceLink(type="resource_link", uri="file:///r", name="r", description="A file")
    )
    assert convert(bare, full) == [
        text("Resource link: file:///r"),
        text("Resource link: file:///r\nName: r\nDescription: A file"),
    ]


def test_audio_and_unknown_types() -> None:
    audio = dump(mt.AudioContent(type="audio", data="AAAA", mime_type="audio/wav"))
    assert convert(audio, {"type": "hologram"}, {}) == [
        text("Unsupported tool result content of type audio"),
        text("Unsupported tool result content of type hologram"),
        text("Unsupported tool result content of type None"),
    ]


def test_empty_content() -> None:
    assert convert() == [text("(the tool returned no content)")]
    assert convert(text("")) == [text("(the tool returned no content)")]
    assert convert(text(""), text("x")) == [text("x")]


def test_mcp_is_error_is_honoured() -> None:
    result = mt.CallToolResult(content=[mt.TextContent(type="text", text="boom")], is_error=True)
    items = [dump(item) for item in result.content]
    assert convert(*items, is_error=result.is_error) == [text("boom")]
    assert convert(*items, is_error=False) == [text("boom")]


def test_tool_error() -> None:
    assert anthropic_tool_error("toolu_9", "tool bmcp_x not found") == {
        "type": "tool_result",
        "tool_use_id": "toolu_9",
        "content": [text("Error: tool bmcp_x not found")],
        "is_error": True,
    }
