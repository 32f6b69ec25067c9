"""Injected MCP tools: naming, Anthropic tool schemas and tool-result conversion (all pure)."""

from __future__ import annotations

from gateway.tools.naming import ToolCatalog, ToolRef, allowed
from gateway.tools.results import anthropic_tool_error, anthropic_tool_result
from gateway.tools.schema import anthropic_tool, inject_anthropic_tools

__all__ = [
    "ToolCatalog",
    "ToolRef",
    "allowed",
    "anthropic_tool",
    "anthropic_tool_error",
    "anthropic_tool_result",
    "inject_anthropic_tools",
]
