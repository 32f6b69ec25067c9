"""Output items of a Responses turn, shared by the stream and blocking rewriters (pure).

What the gateway reads in an output item: client tool calls (for their records), injected
``function_call`` items (the gateway runs them), reasoning summaries and commentary (model
thoughts). Every other item type passes untouched and unread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.intercept.rewriter import StreamError, ToolCall
from gateway.records import ModelThought, Record, ToolUsage

# Items the client must answer before the conversation can go on: a turn with one is final.
CLIENT_CALLS = frozenset(
    {
        "function_call",
        "custom_tool_call",
        "computer_call",
        "local_shell_call",
        "shell_call",
        "apply_patch_call",
        "mcp_approval_request",
    }
)
# Client calls recorded as tool usage -> the field holding their arguments (a computer call
# batching its actions has ``actions`` in place of ``action``).
_ARGUMENTS = {
    "function_call": ("arguments",),
    "custom_tool_call": ("input",),
    "local_shell_call": ("action",),
    "shell_call": ("action",),
    "apply_patch_call": ("operation",),
    "computer_call": ("action", "actions"),
}


@dataclass(frozen=True, slots=True)
class ResponsesTurn:
    """A turn that called only injected tools, as the continuation request needs it."""

    # The upstream response's id (a continuation may chain from it).
    response_id: str
    # Its output items, as the provider sent them (reasoning and the injected calls included).
    items: Sequence[dict[str, Any]]


def text_of(value: Any) -> str:
    """A provider's string field as text: a number as its digits, any other value empty (the
    ``str`` of a deeply nested one exceeds the recursion limit)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return ""


def is_injected_call(item: Any, injected: Callable[[str], bool] | None) -> bool:
    """Whether ``item`` is a ``function_call`` of an injected tool (custom tools never are)."""
    return (
        injected is not None
        and isinstance(item, dict)
        and item.get("type") == "function_call"
        and injected(text_of(item.get("name")))
    )


def is_client_call(item: Any) -> bool:
    """Whether ``item`` is a call the client must answer (a non-string ``type`` is none)."""
    if not isinstance(item, dict):
        return False
    kind = item.get("type")
    return isinstance(kind, str) and kind in CLIENT_CALLS


def tool_call(item: dict[str, Any], response_id: str) -> ToolCall:
    """An injected ``function_call`` item as the call the gateway runs."""
    raw = item.get("arguments")
    args: Any = None
    if isinstance(raw, str) and raw.strip():
        try:
            args = orjson.loads(raw)
        except orjson.JSONDecodeError:
            args = None
    return ToolCall(
        text_of(item.get("call_id")),
        text_of(item.get("name")),
        args if isinstance(args, dict) else {},
        response_id,
        text_of(item.get("id")),
    )


def item_records(
    interception_id: str,
    response_id: str,
    item: Any,
    injected: Callable[[str], bool] | None,
    records: list[Record],
) -> bool:
    """Append the records of one output item; return whether it is a client call.

    Injected calls are recorded by the tool loop when it runs them, not here.
    """
    if not isinstance(item, dict):
        return False
    kind = item.get("type")
    # A provider's ``type`` may be any JSON value: an object or array is unhashable.
    if not isinstance(kind, str):
        return False
    if kind == "reasoning":
        _summaries(interception_id, response_id, item, records)
        return False
    if kind == "message":
        if item.get("phase") == "commentary" or item.get("channel") == "commentary":
            _commentary(interception_id, response_id, item, records)
        return False
    if kind not in CLIENT_CALLS:
        return False
    if is_injected_call(item, injected):
        return False
    fields = _ARGUMENTS.get(kind)
    if fields is not None:
        name = item.get("name")
        raw = next((item[f] for f in fields if item.get(f) is not None), None)
        records.append(
            ToolUsage(
                interception_id=interception_id,
                msg_id=response_id,
                # Built-in client tools (shell, apply_patch, computer) have no name: their type.
                tool=name if isinstance(name, str) and name else kind,
                tool_call_id=text_of(item.get("call_id")),
                args=_args(raw),
                item_id=text_of(item.get("id")),
            )
        )
    return True


def reported_end(response: dict[str, Any]) -> StreamError | None:
    """What a response whose ``status`` is ``failed`` or ``incomplete`` reports; else None."""
    status = response.get("status")
    if status == "failed":
        return failure(response)
    if status == "incomplete":
        return incompleteness(response)
    return None


def failure(response: dict[str, Any]) -> StreamError:
    """A failed response's error (its ``error.code`` and ``.message``)."""
    err = response.get("error")
    err = err if isinstance(err, dict) else {}
    code = err.get("code")
    message = err.get("message")
    return StreamError(
        code if isinstance(code, str) and code else "response_failed",
        message if isinstance(message, str) and message else "the response failed",
    )


def incompleteness(response: dict[str, Any]) -> StreamError:
    """Why a response ended incomplete (``incomplete_details.reason``): no failure."""
    details = response.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    return StreamError(
        "response_incomplete",
        f"the response is incomplete: {reason or 'no reason given'}",
        "incomplete",
    )


def _args(raw: Any) -> str:
    """A call's arguments as JSON text: a function's as sent, a custom tool's free text quoted."""
    if isinstance(raw, str):
        if not raw.strip():
            return "{}"
        if raw[:1] in "{[":
            try:
                orjson.loads(raw)
            except orjson.JSONDecodeError:
                pass
            else:
                return raw
        return orjson.dumps(raw).decode()
    try:
        return orjson.dumps(raw if raw is not None else {}).decode()
    except orjson.JSONEncodeError:  # nested deeper than orjson writes
        return "{}"


def _summaries(iid: str, response_id: str, item: dict[str, Any], records: list[Record]) -> None:
    summary = item.get("summary")
    if not isinstance(summary, list):
        return
    for part in summary:
        text = part.get("text") if isinstance(part, dict) else None
        if isinstance(text, str) and text:
            records.append(ModelThought(iid, response_id, text, source="reasoning_summary"))


def _commentary(iid: str, response_id: str, item: dict[str, Any], records: list[Record]) -> None:
    content = item.get("content")
    if not isinstance(content, list):
        return
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "output_text":
            continue
        text = part.get("text")
        if isinstance(text, str) and text:
            records.append(ModelThought(iid, response_id, text, source="commentary"))


def not_run_reason(client_tool: bool, status: str) -> str:
    """Why the injected calls of a final turn were not run (their ``ToolUsage`` record says)."""
    if client_tool:
        return "not run: the same turn called client tools"
    return f"not run: the response ended {status or 'without a status'}, not completed"
