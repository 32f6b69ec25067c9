"""Chat Completions side of injected tools: definitions, results, the continuation (pure).

An injected tool is an OpenAI function tool, appended after the client's tools. Its parameters
are the MCP input schema reduced as for Anthropic (``gateway.tools.schema``: ``properties`` and
``required`` only). A result is a ``tool`` message; Chat tool messages carry text only, so the
MCP content is converted as for Anthropic (``gateway.tools.results``) and flattened to text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from gateway.intercept.chat.calls import CallSlot
from gateway.tools.naming import ToolRef
from gateway.tools.results import error_text, result_blocks
from gateway.tools.schema import client_tools, tool_schema


def chat_tool(tool_id: str, ref: ToolRef) -> dict[str, Any]:
    """The ``tools`` entry for the injected tool ``ref`` named ``tool_id``."""
    parameters = tool_schema(ref)
    return {
        "type": "function",
        "function": {"name": tool_id, "description": ref.description, "parameters": parameters},
    }


def inject_chat_tools(body: dict[str, Any], tools: Sequence[dict[str, Any]]) -> None:
    """Append ``tools`` to the request ``body`` and turn parallel tool calls off, in place.

    Parallel calls are off because a turn calling injected and client tools together is final
    (neither side can answer the other's calls). Raises ValueError, ``body`` untouched, when its
    shape forbids injection: ``tools`` not an array, or the deprecated ``functions`` in use
    (the API refuses both in one request). No tools: a no-op, the client's choices untouched.
    """
    if not tools:
        return
    own = client_tools(body)
    if body.get("functions") is not None:
        raise ValueError("the request declares deprecated functions, which exclude tools")
    body["tools"] = [*own, *tools]
    body["parallel_tool_calls"] = False


def _text(block: Mapping[str, Any]) -> str:
    if block.get("type") == "text":
        return str(block.get("text") or "")
    source = block.get("source")
    media = source.get("media_type") if isinstance(source, Mapping) else None
    # Tool messages carry text only: the model is told what it did not get.
    return f"(the tool returned an image ({media or 'unknown type'}) that cannot be shown here)"


def chat_tool_result(
    call_id: str, content: Sequence[Mapping[str, Any]], is_error: bool
) -> dict[str, Any]:
    """The ``tool`` message answering ``call_id`` with an MCP call's ``content``.

    A result the MCP server flagged as an error says so, so the model knows the tool failed.
    """
    blocks = result_blocks(content)
    text = "\n".join(_text(block) for block in blocks)
    if is_error:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def chat_tool_error(call_id: str, message: str) -> dict[str, Any]:
    """The ``tool`` message of a call that produced no result (timeout, unknown tool...)."""
    return {"role": "tool", "tool_call_id": call_id, "content": error_text(message)}


def assistant_message(content: str, calls: Sequence[CallSlot]) -> dict[str, Any]:
    """A turn as the assistant message the continuation repeats before the tool results.

    Calls without an id are left out: some providers leave an empty slot (calls starting at
    index 1), which no tool message could answer.
    """
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    message["tool_calls"] = [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in calls
        if call.id
    ]
    return message


def continuation(request: dict[str, Any], assistant: Any, results: Sequence[Any]) -> bytes:
    """The next upstream request: the conversation so far, the turn, one message per result.

    ``request`` is updated in place, so the next continuation extends this one.
    """
    messages = request.get("messages")
    history = messages if isinstance(messages, list) else []
    request["messages"] = [*history, assistant, *results]
    return orjson.dumps(request)
