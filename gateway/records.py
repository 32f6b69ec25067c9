"""Usage records: what the gateway tells the host about each interception (pure data).

One interception (one client request on an intercepted route) yields ``InterceptionStarted``
first and ``InterceptionEnded`` last, whatever the outcome; between them the ``PromptUsage`` of the
last user prompt (once) and, per upstream message, a ``TokenUsage``, a ``ToolUsage`` per tool call
and a ``ModelThought`` per thinking block, in the order the response produced them. Every record
carries the interception id, so a consumer can group them whatever order they arrive in.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Literal

# Records are plain dataclasses, neither frozen nor slotted: a frozen one pays an
# object.__setattr__ per field at construction, and orjson serialises an instance with a
# __dict__ about 3.5x faster than a slotted one (it reads the dict instead of looking up each
# field). They are never mutated after they are built.

CredentialKind = Literal["centralized", "byok"]
# incomplete: the provider ended the response early, by a limit the client chose (OpenAI
# Responses ``response.incomplete``, e.g. ``max_output_tokens``): relayed as is, and no error.
# interrupted: the gateway stopped (crash, kill) mid-interception; written at its next start.
EndStatus = Literal["completed", "failed", "incomplete", "client_disconnected", "interrupted"]


def new_interception_id() -> str:
    """A random (version 4) UUID string, like ``str(uuid.uuid4())`` at a fraction of the cost.

    Ids only need to be unique, not secret: the process-wide generator (seeded from the OS at
    start and again in forked children) saves an entropy syscall per request.
    """
    h = f"{_random_bits(128) & _V4_CLEAR | _V4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_random_bits = random.getrandbits
# Version 4 in bits 76-79, variant 10 in bits 62-63 (RFC 9562).
_V4_CLEAR = ~((0xF << 76) | (0x3 << 62))
_V4_SET = (0x4 << 76) | (0x2 << 62)


@dataclass
class InterceptionStarted:
    """Written before the first upstream call of an interception."""

    interception_id: str
    provider: str
    provider_name: str
    model: str
    actor_id: str
    username: str
    actor_metadata: dict[str, str]
    client: str
    user_agent: str
    client_session_id: str | None
    correlating_tool_call_id: str | None
    credential_kind: CredentialKind
    credential_hint: str
    streaming: bool
    started_at: float = field(default_factory=time.time)
    kind: Literal["interception_started"] = "interception_started"


@dataclass
class InterceptionEnded:
    """Written once per started interception, on success, failure or client disconnect."""

    interception_id: str
    status: EndStatus
    error_type: str = ""
    error_message: str = ""
    upstream_status: int = 0
    ended_at: float = field(default_factory=time.time)
    kind: Literal["interception_ended"] = "interception_ended"


@dataclass
class TokenUsage:
    """Token usage of one upstream message (final, cumulative values; never summed twice).

    Normalised once, by each dialect's ``usage`` module, so that records of every dialect add
    up the same way (the whole prompt is ``input + cache_read + cache_write``, the whole
    completion ``output``):

    - ``input``: prompt tokens neither read from nor written to the prompt cache. Anthropic's
      ``input_tokens`` as is; OpenAI's ``prompt_tokens`` / ``input_tokens`` minus their
      ``cached_tokens``, which OpenAI counts inside them.
    - ``cache_read``: prompt tokens read from the cache (Anthropic
      ``cache_read_input_tokens``, OpenAI ``cached_tokens``).
    - ``cache_write``: prompt tokens written to the cache (Anthropic
      ``cache_creation_input_tokens``; OpenAI reports none). ``cache_write_5m`` and
      ``cache_write_1h`` split it by time to live when the provider says (they sum to
      ``cache_write`` then, else both are 0).
    - ``output``: every generated token, reasoning included (Anthropic ``output_tokens``, which
      counts thinking; OpenAI ``completion_tokens`` / ``output_tokens``).
    - ``reasoning``: the part of ``output`` spent on reasoning, when the provider reports it
      apart (OpenAI ``reasoning_tokens``); 0 otherwise, Anthropic included. Never added to
      ``output`` again.
    - ``extra``: other counters, by the provider's name (``web_search_requests``).
    """

    interception_id: str
    msg_id: str
    input: int = 0
    output: int = 0
    # Keyword-only: positional construction keeps its order of fields.
    reasoning: int = field(default=0, kw_only=True)
    cache_read: int = 0
    cache_write: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    kind: Literal["token_usage"] = "token_usage"


@dataclass
class PromptUsage:
    """The last user prompt of the request, once per interception."""

    interception_id: str
    msg_id: str
    prompt: str
    created_at: float = field(default_factory=time.time)
    kind: Literal["prompt_usage"] = "prompt_usage"


@dataclass
class ToolUsage:
    """A tool call the model made: a client tool relayed as-is, or an injected MCP tool run here."""

    interception_id: str
    msg_id: str
    tool: str
    tool_call_id: str
    args: str
    injected: bool = False
    server_url: str = ""
    invocation_error: str = ""
    # The OpenAI Responses output item's id (``fc_...``), distinct from its ``call_id``; ""
    # for dialects whose calls have no item (Messages, Chat Completions).
    item_id: str = ""
    created_at: float = field(default_factory=time.time)
    kind: Literal["tool_usage"] = "tool_usage"


@dataclass
class ModelThought:
    """A reasoning text the model produced (Anthropic ``thinking`` blocks)."""

    interception_id: str
    msg_id: str
    content: str
    source: str = "thinking"
    created_at: float = field(default_factory=time.time)
    kind: Literal["model_thought"] = "model_thought"


Record = (
    InterceptionStarted | InterceptionEnded | TokenUsage | PromptUsage | ToolUsage | ModelThought
)
