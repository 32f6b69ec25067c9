"""OpenAI Responses blocking responses: records and injected-tool turns (pure).

Without injected tools the client gets the provider's body as it came (response ids are never
rewritten). With them, a response that completed having called only injected tools is a turn
the gateway continues itself; the client gets the last response with the injected calls
removed, the visible output of the earlier turns before its own, the usage summed, and the
client's own ``tools`` and ``parallel_tool_calls`` in place of the injected request's echo. With
``store: false`` nothing chains from its id: it keeps the first turn's, as the stream does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from gateway.intercept.responses.output import (
    ResponsesTurn,
    is_injected_call,
    item_records,
    not_run_reason,
    reported_end,
    tool_call,
)
from gateway.intercept.responses.tools import client_parallel, hide_injection
from gateway.intercept.responses.usage import summed_usage, usage_record
from gateway.intercept.rewriter import BlockingResult, ToolCall
from gateway.records import PromptUsage, Record


class BlockingTurns:
    """The upstream responses of one blocking interception, one ``feed`` per upstream call."""

    def __init__(
        self,
        interception_id: str,
        prompt: str | None,
        injected: Callable[[str], bool] | None = None,
        client_parallel_tool_calls: Any = None,
        store: bool = True,
    ) -> None:
        """``client_parallel_tool_calls``: the client's own value (None: unset), shown to it in
        the answer when tools were injected; ``store``: False for ``store: false``."""
        self.interception_id = interception_id
        self._prompt = prompt
        self._injected = injected
        self._client_parallel = client_parallel_tool_calls
        self._store = store
        # The first turn's response id ("" until known).
        self._first_id = ""
        self.turns = 0
        # The visible output items and usage objects of the turns the gateway continued.
        self._earlier_items: list[Any] = []
        self._earlier_usage: list[Any] = []

    def feed(self, body: bytes) -> BlockingResult:
        """Account one 200 response; say whether to continue (``tool_calls``) or answer."""
        try:
            response = orjson.loads(body)
        except orjson.JSONDecodeError:
            response = None
        records: list[Record] = []
        first = self.turns == 0
        self.turns += 1
        if not isinstance(response, dict) or not isinstance(response.get("id"), str):
            if first and self._prompt is not None:
                records.append(PromptUsage(self.interception_id, "", self._prompt))
            return BlockingResult(body, records, "upstream returned a body that is not a response")
        rid: str = response["id"]
        if first:
            self._first_id = rid
            if self._prompt is not None:
                records.append(PromptUsage(self.interception_id, rid, self._prompt))
        records.append(usage_record(self.interception_id, rid, response.get("usage")))
        output = response.get("output")
        items: list[Any] = output if isinstance(output, list) else []
        client_tool = False
        calls: list[ToolCall] = []
        for item in items:
            if item_records(self.interception_id, rid, item, self._injected, records):
                client_tool = True
            elif is_injected_call(item, self._injected):
                calls.append(tool_call(item, rid))
        status = response.get("status")
        status = status if isinstance(status, str) else ""
        visible = [i for i in items if not is_injected_call(i, self._injected)]
        if calls and not client_tool and status == "completed":
            self._earlier_items += visible
            self._earlier_usage.append(response.get("usage"))
            turn = ResponsesTurn(rid, [i for i in items if isinstance(i, dict)])
            return BlockingResult(
                body, records, tool_calls=calls, assistant=turn, stop_reason=status
            )
        injected = self._injected
        changed = injected is not None and hide_injection(
            response, injected, client_parallel(self._client_parallel)
        )
        if len(visible) != len(items) or self._earlier_items or self._earlier_usage:
            if isinstance(output, list):
                response["output"] = [*self._earlier_items, *visible]
            usage = response.get("usage")
            if isinstance(usage, dict) and self._earlier_usage:
                response["usage"] = summed_usage(usage, self._earlier_usage)
            changed = True
        if not self._store and not first and self._first_id and rid != self._first_id:
            response["id"] = self._first_id
            changed = True
        if changed:
            body = orjson.dumps(response)
        reason = not_run_reason(client_tool, status)
        return BlockingResult(
            body,
            records,
            skipped_calls=calls,
            skip_reason=reason,
            stop_reason=status,
            reported=reported_end(response),
        )
