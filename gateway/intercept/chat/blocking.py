"""Chat Completions blocking responses: id rewrite, records, injected-tool turns (pure)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from gateway.intercept.chat.calls import CallSlot, not_run_reason
from gateway.intercept.chat.tools import assistant_message
from gateway.intercept.chat.usage import ChatUsage, add_usage, apply_totals
from gateway.intercept.rewriter import BlockingResult
from gateway.records import PromptUsage, Record


class ChatBlocking:
    """The upstream responses of one blocking interception, one ``feed`` per upstream call.

    With injected tools, a completion with one choice that stopped on ``tool_calls`` having
    called injected tools only is a turn the gateway continues itself; any other is final, its
    injected calls removed and not run. The last completion goes to the client with the
    interception id and, after a loop, its usage values summed over the turns.
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
        self._totals: dict[str, Any] = {}
        self.turns = 0

    def feed(self, body: bytes) -> BlockingResult:
        """Account one 200 response; say whether to continue (``tool_calls``) or answer."""
        try:
            completion = orjson.loads(body)
        except orjson.JSONDecodeError:
            completion = None
        records: list[Record] = []
        first = self.turns == 0
        self.turns += 1
        choices = completion.get("choices") if isinstance(completion, dict) else None
        if not isinstance(completion, dict) or not isinstance(choices, list):
            if first and self._prompt is not None:
                records.append(PromptUsage(self.interception_id, "", self._prompt))
            error = "upstream returned a body that is not a chat completion"
            return BlockingResult(body, records, error)
        raw_id = completion.get("id")
        msg_id = raw_id if isinstance(raw_id, str) else ""
        if first and self._prompt is not None:
            records.append(PromptUsage(self.interception_id, msg_id, self._prompt))
        usage = completion.get("usage")
        if isinstance(usage, dict):
            counted = ChatUsage()
            counted.update(usage)
            records.append(counted.record(self.interception_id, msg_id))
            add_usage(self._totals, usage)
        injected, client = self._calls(choices)
        records.extend(slot.usage(self.interception_id, msg_id) for slot in client)
        first_choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        finish = first_choice.get("finish_reason")
        stop_reason = finish if isinstance(finish, str) else ""
        calls = [slot.tool_call(msg_id) for slot in injected]
        if calls and not client and len(choices) == 1 and stop_reason == "tool_calls":
            message = first_choice.get("message")
            content = message.get("content") if isinstance(message, dict) else None
            assistant = assistant_message(content if isinstance(content, str) else "", injected)
            return BlockingResult(
                body, records, tool_calls=calls, assistant=assistant, stop_reason=stop_reason
            )
        client_body = self._client_body(body, completion, msg_id, bool(calls))
        reason = ""
        if calls:
            reason = not_run_reason(bool(client), len(choices), stop_reason)
        return BlockingResult(
            client_body, records, skipped_calls=calls, skip_reason=reason, stop_reason=stop_reason
        )

    def _calls(self, choices: list[Any]) -> tuple[list[CallSlot], list[CallSlot]]:
        """The injected and the client calls of every choice's message."""
        injected: list[CallSlot] = []
        client: list[CallSlot] = []
        for index, choice in enumerate(choices):
            message = choice.get("message") if isinstance(choice, dict) else None
            calls = message.get("tool_calls") if isinstance(message, dict) else None
            if not isinstance(calls, list):
                continue
            for call in calls:
                if not isinstance(call, dict):
                    continue
                function = call.get("function")
                custom = not isinstance(function, dict) and isinstance(call.get("custom"), dict)
                if custom:
                    function = call["custom"]
                function = function if isinstance(function, dict) else {}
                slot = CallSlot(index, _scalar(call.get("id")), _scalar(function.get("name")))
                slot.custom = custom
                arguments = function.get("input" if custom else "arguments")
                if isinstance(arguments, str) and arguments:
                    slot.parts.append(arguments)
                if not custom and self._injected is not None and self._injected(slot.name):
                    slot.injected = True
                    injected.append(slot)
                else:
                    client.append(slot)
        return injected, client

    def _client_body(
        self, body: bytes, completion: dict[str, Any], msg_id: str, hide_calls: bool
    ) -> bytes:
        if hide_calls:
            # Injected calls left in a final turn are not run: the client must not see them, or
            # it would owe a result for a tool it does not know.
            self._remove_injected(completion)
        elif self.turns == 1 and msg_id:
            quoted = orjson.dumps(msg_id)
            i = body.find(quoted)
            end = i + len(quoted)
            if i >= 0 and body.find(quoted, end) < 0:
                return b"".join((body[:i], orjson.dumps(self.interception_id), body[end:]))
        if "id" in completion:
            completion["id"] = self.interception_id
        usage = completion.get("usage")
        if self.turns > 1 and isinstance(usage, dict):
            apply_totals(usage, self._totals)
        try:
            return orjson.dumps(completion)
        except TypeError:  # nested deeper than orjson writes (255 levels): relayed as it came
            return body

    def _remove_injected(self, completion: dict[str, Any]) -> None:
        assert self._injected is not None
        for choice in completion["choices"]:
            message = choice.get("message") if isinstance(choice, dict) else None
            calls = message.get("tool_calls") if isinstance(message, dict) else None
            if not isinstance(message, dict) or not isinstance(calls, list):
                continue
            visible = [call for call in calls if not self._is_injected(call)]
            if visible:
                message["tool_calls"] = visible
            else:
                del message["tool_calls"]

    def _is_injected(self, call: Any) -> bool:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        return self._injected is not None and self._injected(_scalar(name))


def _scalar(value: Any) -> str:
    """A call's id or name as text; a nested value is none (``str`` of one a thousand levels
    deep would exhaust the stack)."""
    return str(value) if value and isinstance(value, str | int | float) else ""
