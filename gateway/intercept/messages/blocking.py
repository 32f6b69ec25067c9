"""Anthropic Messages blocking responses: id rewrite, records, injected-tool turns (pure)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from gateway.intercept.messages.rewrite_id import replace_id
from gateway.intercept.messages.turn import not_run_reason
from gateway.intercept.messages.usage import MessageUsage
from gateway.intercept.rewriter import BlockingResult, ToolCall
from gateway.records import ModelThought, PromptUsage, Record, ToolUsage


class BlockingTurns:
    """The upstream responses of one blocking interception, one ``feed`` per upstream call.

    With injected tools, a response that stopped on ``tool_use`` and whose only tool calls are
    injected ones is a turn the gateway continues itself (``tool_calls`` is non-empty); any other
    response is final, its injected calls dropped and not run. The last response goes to the
    client with the interception id and, after a loop, the usage of every turn summed.
    """

    def __init__(
        self,
        interception_id: str,
        prompt: str | None,
        injected: Callable[[str], bool] | None = None,
    ) -> None:
        self.interception_id = interception_id
        self._prompt = prompt
        self._injected = injected
        self._totals = MessageUsage()
        self.turns = 0

    def feed(self, body: bytes) -> BlockingResult:
        """Account one 200 response; say whether to continue (``tool_calls``) or answer."""
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            message = None
        records: list[Record] = []
        first = self.turns == 0
        self.turns += 1
        if not isinstance(message, dict) or not isinstance(message.get("id"), str):
            if first and self._prompt is not None:
                records.append(PromptUsage(self.interception_id, "", self._prompt))
            return BlockingResult(body, records, "upstream returned a body that is not a message")
        msg_id: str = message["id"]
        if first and self._prompt is not None:
            records.append(PromptUsage(self.interception_id, msg_id, self._prompt))
        usage = MessageUsage()
        usage.update(message.get("usage"))
        records.append(usage.record(self.interception_id, msg_id))
        self._totals = self._totals.plus(usage)
        content = message.get("content")
        content = content if isinstance(content, list) else []
        calls, client_tool = self._content_records(content, msg_id, records)
        stop = message.get("stop_reason")
        stop_reason = stop if isinstance(stop, str) else ""
        if calls and not client_tool and stop_reason == "tool_use":
            assistant = _assistant(content)
            return BlockingResult(
                body, records, tool_calls=calls, assistant=assistant, stop_reason=stop_reason
            )
        client_body = self._client_body(body, message, msg_id, content)
        reason = not_run_reason(client_tool, stop_reason)
        return BlockingResult(
            client_body, records, skipped_calls=calls, skip_reason=reason, stop_reason=stop_reason
        )

    def _client_body(
        self, body: bytes, message: dict[str, Any], msg_id: str, content: list[Any]
    ) -> bytes:
        # Injected calls left in a final turn are not run: the client must not see them, or it
        # would owe a result for a tool it does not know.
        visible = [b for b in content if not self._is_injected_call(b)]
        if len(visible) != len(content):
            message["content"] = visible
        elif self.turns == 1:
            rewritten = replace_id(body, msg_id, self.interception_id)
            if rewritten is not None:
                return rewritten
        message["id"] = self.interception_id
        if self.turns > 1:
            usage = message.get("usage")
            usage = usage if isinstance(usage, dict) else {}
            usage.update(self._totals.as_anthropic())
            message["usage"] = usage
        return orjson.dumps(message)

    def _content_records(
        self, content: list[Any], msg_id: str, records: list[Record]
    ) -> tuple[list[ToolCall], bool]:
        """Append thoughts and client tool calls to ``records``.

        Returns the injected calls and whether client tools were called too (then the turn goes
        back to the client, which must answer first).
        """
        injected: list[ToolCall] = []
        client_tool = False
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "thinking":
                text = block.get("thinking")
                if isinstance(text, str) and text:
                    records.append(ModelThought(self.interception_id, msg_id, text))
            elif kind == "tool_use":
                name = str(block.get("name") or "")
                tool_id = str(block.get("id") or "")
                args = block.get("input")
                if self._injected is not None and self._injected(name):
                    injected.append(
                        ToolCall(tool_id, name, args if isinstance(args, dict) else {}, msg_id)
                    )
                    continue
                client_tool = True
                records.append(
                    ToolUsage(
                        interception_id=self.interception_id,
                        msg_id=msg_id,
                        tool=name,
                        tool_call_id=tool_id,
                        args=orjson.dumps(args if args is not None else {}).decode(),
                    )
                )
        return injected, client_tool

    def _is_injected_call(self, block: Any) -> bool:
        return (
            self._injected is not None
            and isinstance(block, dict)
            and block.get("type") == "tool_use"
            and self._injected(str(block.get("name") or ""))
        )


def _assistant(content: list[Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": content}
