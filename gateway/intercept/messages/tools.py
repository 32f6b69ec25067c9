"""Anthropic Messages side of the agentic loop: the continuation request (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson


def continuation(request: dict[str, Any], assistant: Any, results: Sequence[Any]) -> bytes:
    """The next upstream request: the conversation so far, the turn, its ``tool_result`` blocks.

    ``request`` is updated in place, so the next continuation extends this one.
    """
    messages = request.get("messages")
    history = messages if isinstance(messages, list) else []
    # All results of a turn go in one user message, as the API requires.
    request["messages"] = [*history, assistant, {"role": "user", "content": list(results)}]
    return orjson.dumps(request)
