"""What a Messages turn ended with, shared by the stream and blocking rewriters (pure).

The calls themselves are every dialect's ``gateway.intercept.rewriter.ToolCall``.
"""

from __future__ import annotations


def not_run_reason(client_tool: bool, stop_reason: str) -> str:
    """Why the injected calls of a final turn were not run (their ``ToolUsage`` record says)."""
    if client_tool:
        return "not run: the same turn called client tools"
    return f"not run: the turn stopped on {stop_reason or 'no stop_reason'}, not tool_use"
