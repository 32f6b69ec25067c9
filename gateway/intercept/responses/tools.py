"""OpenAI Responses side of injected tools: definitions, results, continuation (pure)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from gateway.intercept.responses.output import ResponsesTurn, text_of
from gateway.tools.naming import ToolRef
from gateway.tools.results import error_text, result_blocks
from gateway.tools.schema import client_tools, tool_schema


def function_tool(tool_id: str, ref: ToolRef) -> dict[str, Any]:
    """The ``tools`` entry of the injected tool ``ref`` named ``tool_id``.

    The parameters keep only ``properties`` and ``required`` of the MCP input schema, as for
    Messages (``gateway.tools.schema``); ``properties`` is always an object, so a schema with
    ``required`` and no ``properties`` stays valid.
    """
    return {
        "type": "function",
        "name": tool_id,
        "description": ref.description,
        "parameters": tool_schema(ref),
        "strict": False,
    }


def inject_tools(body: dict[str, Any], tools: Sequence[dict[str, Any]]) -> None:
    """Append ``tools`` to the request's ``tools`` and turn parallel tool calls off, in place.

    Appended, so the client's tools keep their place (and the provider's prompt cache of them).
    Parallel calls are off: a turn calling injected and client tools together would be final,
    its injected calls dropped unrun. Raises ValueError, the body untouched, when ``tools`` is
    no array. An empty ``tools`` is a no-op: without injection nothing is touched.
    """
    if not tools:
        return
    body["tools"] = [*client_tools(body), *tools]
    body["parallel_tool_calls"] = False


def client_parallel(value: Any) -> bool:
    """The ``parallel_tool_calls`` a response echoes for a client that sent ``value``: its own,
    or the provider's default (on) when it sent none."""
    return value if isinstance(value, bool) else True


def hide_injection(
    response: dict[str, Any], injected: Callable[[str], bool], parallel_tool_calls: bool
) -> bool:
    """Undo, in the ``response`` object the provider echoes, what :func:`inject_tools` did.

    The provider echoes the request's ``tools`` and ``parallel_tool_calls``: the client must see
    its own, not the injected definitions nor parallel calls turned off. Return whether
    ``response`` changed (a key the echo lacks is never added).
    """
    changed = False
    tools = response.get("tools")
    if isinstance(tools, list):
        kept = [tool for tool in tools if not _injected_tool(tool, injected)]
        if len(kept) != len(tools):
            response["tools"] = kept
            changed = True
    echoed = response.get("parallel_tool_calls")
    if type(echoed) is bool and echoed is not parallel_tool_calls:
        response["parallel_tool_calls"] = parallel_tool_calls
        changed = True
    return changed


def _injected_tool(tool: Any, injected: Callable[[str], bool]) -> bool:
    # Injected tools are top-level functions (``function_tool``), named from the catalogue.
    return (
        isinstance(tool, dict)
        and tool.get("type") == "function"
        and injected(text_of(tool.get("name")))
    )


def refuse_tools(body: dict[str, Any], tools: Sequence[dict[str, Any]]) -> None:
    """Compaction requests get no injected tools: a compaction calls none."""
    if tools:
        raise ValueError("a compaction request takes no injected tools")


def _part(block: Mapping[str, Any]) -> dict[str, Any]:
    if block.get("type") == "image":
        source = block.get("source")
        if isinstance(source, Mapping):
            url = f"data:{source.get('media_type')};base64,{source.get('data')}"
            return {"type": "input_image", "image_url": url}
    return {"type": "input_text", "text": str(block.get("text") or "")}


def function_call_output(
    call_id: str, content: Sequence[Mapping[str, Any]], is_error: bool
) -> dict[str, Any]:
    """The ``function_call_output`` item answering ``call_id`` with an MCP call's ``content``.

    The content is converted as for Messages (``gateway.tools.results``: resources described,
    unsupported content explained, base64 blobs never pasted). Text only gives a string output,
    images an array of input parts. The item has no error flag: a failed call says so in text.
    """
    blocks = result_blocks(content)
    parts = [_part(block) for block in blocks]
    if is_error:
        parts.insert(0, {"type": "input_text", "text": "Error: the tool reported a failure."})
    output: str | list[dict[str, Any]]
    if all(part["type"] == "input_text" for part in parts):
        output = "\n".join(part["text"] for part in parts)
    else:
        output = parts
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def function_call_error(call_id: str, message: str) -> dict[str, Any]:
    """The ``function_call_output`` of a call that produced no MCP result (timeout, unknown)."""
    text = error_text(message)
    return {"type": "function_call_output", "call_id": call_id, "output": text}


def continuation(request: dict[str, Any], assistant: Any, results: Sequence[Any]) -> bytes:
    """The next upstream request after a turn that called only injected tools.

    A request that lets the provider keep the conversation (``conversation``, or
    ``previous_response_id`` with storage on) chains from it: the next request chains from the
    turn's response (``previous_response_id`` set to its id; inside a ``conversation`` the
    provider appends the turn itself) and sends only the tool outputs. Resending the turn there
    would repeat it in the provider's context. Any other request is stateless: the next one
    repeats the input, the turn's output items (reasoning items included, which reasoning models
    require before their calls) and the tool outputs. ``request`` is updated in place, so the
    next continuation extends this one.
    """
    turn: ResponsesTurn = assistant
    stored = request.get("store") is not False
    if request.get("conversation") is not None:
        request["input"] = list(results)
    elif isinstance(request.get("previous_response_id"), str) and stored:
        request["previous_response_id"] = turn.response_id
        request["input"] = list(results)
    else:
        items = request.get("input")
        if isinstance(items, str):
            history: list[Any] = [{"role": "user", "content": items}]
        else:
            history = items if isinstance(items, list) else []
        request["input"] = [*history, *_replayable(turn.items, stored), *results]
    return orjson.dumps(request)


def _replayable(items: Sequence[dict[str, Any]], stored: bool) -> list[dict[str, Any]]:
    """Output items as input items of the next request.

    Without storage (``store: false``) the provider knows no item by id: ids are left out, and
    a reasoning item can only be replayed with its ``encrypted_content``.
    """
    if stored:
        return list(items)
    out = []
    for item in items:
        if item.get("type") == "reasoning" and not item.get("encrypted_content"):
            continue
        out.append({k: v for k, v in item.items() if k != "id"})
    return out
