"""Names the model sees for injected MCP tools, and the allow/deny filter (pure).

An injected tool is shown to the model as ``bmcp_<server>_<tool>``. Providers only accept tool
names matching ``[A-Za-z0-9_-]{1,64}``, while MCP server ids and tool names are free text, so the
id is sanitised and, when it would be too long or ambiguous, disambiguated with a short hash. The
mapping cannot be parsed back (both parts may contain ``_``), hence the catalog keeps a lookup
table from id to tool.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

PREFIX = "bmcp_"
MAX_ID_LENGTH = 64
_HASH_LENGTH = 8
_INVALID = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class ToolRef:
    """One tool offered by a central MCP server, as listed by ``tools/list``."""

    server_id: str
    server_url: str
    name: str
    description: str
    input_schema: Mapping[str, Any]


def allowed(name: str, allow: re.Pattern[str] | None, deny: re.Pattern[str] | None) -> bool:
    """Whether the MCP tool ``name`` (un-prefixed) passes the allow/deny patterns.

    Unanchored, case-sensitive search as in the reference (Go's ``MatchString``); deny wins over
    allow, and once an allow pattern exists anything it does not match is excluded.
    """
    if deny is not None and deny.search(name):
        return False
    return allow is None or allow.search(name) is not None


def _sanitise(text: str) -> str:
    # An explicit ASCII class: ``\w`` would let unicode letters through, which providers reject.
    return _INVALID.sub("_", text)


def _hashed(base: str, ref: ToolRef, attempt: int) -> str:
    # The hash covers the original (unsanitised) pair, so distinct tools get distinct suffixes even
    # when their sanitised/truncated prefixes are equal. ``attempt`` only matters in the
    # adversarial case where a tool's plain name already looks like another tool's hashed id.
    key = f"{ref.server_id}\0{ref.name}"
    if attempt:
        key += f"\0{attempt}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LENGTH]
    return f"{base[: MAX_ID_LENGTH - _HASH_LENGTH - 1]}_{digest}"


class ToolCatalog:
    """The injectable tools of one request, each with its unique provider-safe id.

    Immutable after construction. Ids are assigned in ``(server_id, name)`` order so the result
    does not depend on the order servers answered in; ``tools`` is sorted by id so identical
    requests produce byte-identical upstream bodies (provider prompt caches depend on it).
    """

    __slots__ = ("_by_id", "_tools")

    def __init__(self, refs: Iterable[ToolRef]) -> None:
        """Assign ids to ``refs``; a repeated ``(server_id, name)`` pair raises ValueError."""
        by_id: dict[str, ToolRef] = {}
        seen: set[tuple[str, str]] = set()
        for ref in sorted(refs, key=lambda r: (r.server_id, r.name)):
            pair = (ref.server_id, ref.name)
            if pair in seen:
                raise ValueError(f"duplicate tool {ref.name!r} on MCP server {ref.server_id!r}")
            seen.add(pair)
            by_id[self._assign(ref, by_id)] = ref
        self._tools: tuple[tuple[str, ToolRef], ...] = tuple(sorted(by_id.items()))
        self._by_id: Mapping[str, ToolRef] = by_id

    @staticmethod
    def _assign(ref: ToolRef, taken: Mapping[str, ToolRef]) -> str:
        base = _sanitise(f"{PREFIX}{ref.server_id}_{ref.name}")
        if len(base) <= MAX_ID_LENGTH and base not in taken:
            return base
        attempt = 0
        while (tool_id := _hashed(base, ref, attempt)) in taken:
            attempt += 1
        return tool_id

    @property
    def tools(self) -> tuple[tuple[str, ToolRef], ...]:
        """All ``(id, tool)`` pairs, sorted by id."""
        return self._tools

    def lookup(self, tool_id: str) -> ToolRef | None:
        """The tool the model meant by ``tool_id``, or None if it is not an injected tool."""
        return self._by_id.get(tool_id)

    def __iter__(self) -> Iterator[tuple[str, ToolRef]]:
        return iter(self._tools)

    def __len__(self) -> int:
        return len(self._tools)

    def __bool__(self) -> bool:
        return bool(self._tools)

    def __repr__(self) -> str:
        return f"ToolCatalog({[tool_id for tool_id, _ in self._tools]!r})"
