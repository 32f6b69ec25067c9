"""Anthropic Messages tool definitions for injected MCP tools, and their injection (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gateway.tools.naming import ToolRef

_PARALLEL_CHOICES = frozenset({"auto", "any", "tool"})


def anthropic_tool(tool_id: str, ref: ToolRef) -> dict[str, Any]:
    """The Messages API ``tools`` entry for the injected tool ``ref`` named ``tool_id``."""
    return {"name": tool_id, "description": ref.description, "input_schema": tool_schema(ref)}


def tool_schema(ref: ToolRef) -> dict[str, Any]:
    """The JSON schema of the injected tool ``ref``'s input, as every dialect declares it.

    Only ``properties`` and ``required`` survive from the MCP input schema, as in the reference:
    MCP servers emit JSON-Schema keywords (``$schema``, ``additionalProperties``, ``$defs``…) that
    providers may reject at the top level of a tool's schema.
    """
    schema = ref.input_schema
    properties = schema.get("properties")
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": dict(properties) if isinstance(properties, Mapping) else {},
    }
    required = schema.get("required")
    if isinstance(required, list | tuple):
        names = [name for name in required if isinstance(name, str)]
        # An empty ``required`` adds bytes and is rejected by some schema validators.
        if names:
            input_schema["required"] = names
    return input_schema


def _rewritten_tool_choice(choice: Any) -> Any:
    # Parallel use is switched off: a turn calling injected and client tools together would be
    # final (the client cannot answer the injected calls, nor the gateway the client's), its
    # injected calls dropped unrun. (Several injected calls in one turn would run concurrently.)
    if choice is None:
        return {"type": "auto", "disable_parallel_tool_use": True}
    if not isinstance(choice, dict):
        raise ValueError(f"tool_choice must be an object, got {type(choice).__name__}")
    kind = choice.get("type")
    if kind is None or kind == "":
        return {**choice, "type": "auto", "disable_parallel_tool_use": True}
    if not isinstance(kind, str):
        raise ValueError(f"tool_choice.type must be a string, got {type(kind).__name__}")
    if kind == "none":
        return choice
    if kind in _PARALLEL_CHOICES:
        return {**choice, "disable_parallel_tool_use": True}
    raise ValueError(f"unknown tool_choice.type {kind!r}")


def client_tools(body: dict[str, Any]) -> list[Any]:
    """The request's own ``tools`` (none: an empty list); ValueError when it is no array, so the
    caller can forward the request without injection."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError(f"tools must be an array, got {type(tools).__name__}")
    return tools


def inject_anthropic_tools(body: dict[str, Any], tools: Sequence[dict[str, Any]]) -> None:
    """Prepend ``tools`` to the request ``body`` and rewrite its ``tool_choice`` in place.

    Injected tools go first so a client ``cache_control`` breakpoint on its last tool stays last.
    Raises ValueError, leaving ``body`` untouched, when ``tools`` or ``tool_choice`` in the body
    has a shape that cannot be rewritten; the caller then forwards the request without injection.
    An empty ``tools`` is a no-op: without injection the client's choices must not be touched.
    """
    if not tools:
        return
    own = client_tools(body)
    # Validate everything before mutating so a failure leaves the client's request intact.
    choice = _rewritten_tool_choice(body.get("tool_choice"))
    body["tools"] = [*tools, *own]
    body["tool_choice"] = choice
