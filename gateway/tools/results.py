"""Conversion of MCP tool-call results to Anthropic ``tool_result`` blocks (pure).

The caller turns the SDK's ``CallToolResult`` into plain JSON data (``model_dump(by_alias=True)``)
first, so this module needs no MCP import and is easy to test with literal dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# The media types Anthropic accepts in an image block; others would fail the whole request.
IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
NO_CONTENT = "(the tool returned no content)"


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _base64_size(blob: str) -> int:
    # Decoded size by arithmetic, without decoding a possibly huge (or malformed) payload.
    data = "".join(blob.split())
    return max(len(data) * 3 // 4 - (len(data) - len(data.rstrip("="))), 0)


def _resource(resource: Any) -> dict[str, Any]:
    if not isinstance(resource, Mapping):
        return _text("Unsupported embedded resource")
    mime = resource.get("mimeType") or "unknown"
    uri = resource.get("uri", "")
    text = resource.get("text")
    if isinstance(text, str):
        return _text(f"Resource (MIME: {mime}, URI: {uri}):\n{text}")
    blob = resource.get("blob")
    if isinstance(blob, str):
        # Only describe binary data: pasting megabytes of base64 into the model's context costs
        # tokens and money and the model cannot make use of it anyway.
        size = _base64_size(blob)
        return _text(f"Binary resource (MIME: {mime}, URI: {uri}), {size} bytes base64")
    return _text(f"Unsupported embedded resource (URI: {uri})")


def _resource_link(item: Mapping[str, Any]) -> dict[str, Any]:
    lines = [f"Resource link: {item.get('uri', '')}"]
    for key in ("name", "description"):
        value = item.get(key)
        if isinstance(value, str) and value:
            lines.append(f"{key.capitalize()}: {value}")
    return _text("\n".join(lines))


def _image(item: Mapping[str, Any]) -> dict[str, Any]:
    mime = item.get("mimeType")
    data = item.get("data")
    if mime in IMAGE_MEDIA_TYPES and isinstance(data, str) and data:
        return {"type": "image", "source": {"type": "base64", "media_type": mime, "data": data}}
    return _text(f"Unsupported image content (MIME: {mime or 'unknown'})")


def _block(item: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = item.get("type")
    if kind == "text":
        text = item.get("text")
        # Anthropic rejects empty text blocks, so an empty text item is dropped.
        return _text(text) if isinstance(text, str) and text else None
    if kind == "image":
        return _image(item)
    if kind == "resource":
        return _resource(item.get("resource"))
    if kind == "resource_link":
        return _resource_link(item)
    return _text(f"Unsupported tool result content of type {kind}")


def anthropic_tool_result(
    tool_use_id: str, content: Sequence[Mapping[str, Any]], is_error: bool
) -> dict[str, Any]:
    """The ``tool_result`` block answering ``tool_use_id`` with an MCP call's ``content``.

    Unlike the reference, the MCP result's ``isError`` is passed through as ``is_error`` so the
    model knows the tool failed; unsupported content becomes an explanatory text block instead of
    turning a successful call into an error.
    """
    return {
        "type": "tool_result",
        "tool_use_id": tool_use_id,
        "content": result_blocks(content),
        "is_error": bool(is_error),
    }


def result_blocks(content: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """An MCP call's ``content`` as text and image blocks, every dialect's starting point:
    resources described, unsupported content explained, base64 blobs never pasted."""
    blocks = [block for item in content if (block := _block(item)) is not None]
    return blocks or [_text(NO_CONTENT)]


def error_text(message: str) -> str:
    """The text a call that produced no MCP result (timeout, unknown tool…) answers with."""
    return f"Error: {message}"


def anthropic_tool_error(tool_use_id: str, message: str) -> dict[str, Any]:
    """A failed ``tool_result`` for a call that produced no MCP result (timeout, unknown tool…)."""
    return {
        "type": "tool_result",
        "tool_use_id": tool_use_id,
        "content": [_text(error_text(message))],
        "is_error": True,
    }
