"""Anthropic Messages blocking responses: id rewrite and records (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.intercept.messages.rewrite_id import replace_id
from gateway.intercept.messages.usage import MessageUsage
from gateway.records import ModelThought, PromptUsage, Record, ToolUsage


@dataclass(frozen=True, slots=True)
class BlockingResult:
    """What to send back to the client and what to record for one blocking response."""

    body: bytes
    records: list[Record]
    error: str = ""


def rewrite_blocking(body: bytes, interception_id: str, prompt: str | None) -> BlockingResult:
    """Rewrite the message id of a 200 response body and extract its records.

    A body that is not a JSON message is relayed untouched and reported in ``error``.
    """
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        message = None
    records: list[Record] = []
    if not isinstance(message, dict) or not isinstance(message.get("id"), str):
        if prompt is not None:
            records.append(PromptUsage(interception_id, "", prompt))
        return BlockingResult(body, records, "upstream returned a body that is not a message")
    msg_id: str = message["id"]
    if prompt is not None:
        records.append(PromptUsage(interception_id, msg_id, prompt))
    usage = MessageUsage()
    usage.update(message.get("usage"))
    records.append(usage.record(interception_id, msg_id))
    content = message.get("content")
    if isinstance(content, list):
        records.extend(_content_records(content, interception_id, msg_id))
    rewritten = replace_id(body, msg_id, interception_id)
    if rewritten is None:
        message["id"] = interception_id
        rewritten = orjson.dumps(message)
    return BlockingResult(rewritten, records)


def _content_records(content: list[Any], interception_id: str, msg_id: str) -> list[Record]:
    records: list[Record] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "thinking":
            text = block.get("thinking")
            if isinstance(text, str) and text:
                records.append(ModelThought(interception_id, msg_id, text))
        elif kind == "tool_use":
            records.append(
                ToolUsage(
                    interception_id=interception_id,
                    msg_id=msg_id,
                    tool=str(block.get("name") or ""),
                    tool_call_id=str(block.get("id") or ""),
                    args=orjson.dumps(block.get("input", {})).decode(),
                )
            )
    return records
