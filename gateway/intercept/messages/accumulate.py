"""Rebuild an assistant turn from its stream events, for the continuation request (pure).

Only needed when the gateway runs injected tools: the next upstream request must resend the
assistant's turn verbatim (thinking blocks with their signatures included), followed by the tool
results. Deltas are applied by block index; tool inputs are joined and parsed once at the end
(re-parsing partial JSON on every delta, as the SDK does, is quadratic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

_DELTA_FIELDS = {
    "text_delta": ("text", "text"),
    "thinking_delta": ("thinking", "thinking"),
    "signature_delta": ("signature", "signature"),
    "citations_delta": ("citations", "citation"),
}


@dataclass(slots=True)
class _Pending:
    block: dict[str, Any]
    json_parts: list[str] = field(default_factory=list)


class TurnAccumulator:
    """Collects the content blocks of one upstream message, in index order."""

    def __init__(self) -> None:
        self._blocks: dict[int, _Pending] = {}

    def start(self, index: int, block: dict[str, Any]) -> None:
        """A ``content_block_start``."""
        self._blocks[index] = _Pending(dict(block))

    def delta(self, index: int, delta: dict[str, Any]) -> None:
        """A ``content_block_delta``."""
        pending = self._blocks.get(index)
        if pending is None:
            return
        kind = delta.get("type")
        if kind == "input_json_delta":
            part = delta.get("partial_json")
            if isinstance(part, str):
                pending.json_parts.append(part)
            return
        target = _DELTA_FIELDS.get(str(kind))
        if target is None:
            return
        key, source = target
        value = delta.get(source)
        if key == "citations":
            pending.block.setdefault("citations", []).append(value)
        elif isinstance(value, str):
            pending.block[key] = str(pending.block.get(key) or "") + value

    def content(self) -> list[dict[str, Any]]:
        """The turn's blocks as request content (tool inputs parsed)."""
        out = []
        for _, pending in sorted(self._blocks.items()):
            block = pending.block
            if pending.json_parts:
                raw = "".join(pending.json_parts)
                try:
                    block["input"] = orjson.loads(raw) if raw.strip() else {}
                except orjson.JSONDecodeError:
                    block["input"] = {}
            if block.get("type") == "text" and block.get("citations") is None:
                block.pop("citations", None)
            out.append(block)
        return out
