"""OpenAI Responses API: request parsing, stream rewriting, blocking responses (pure).

The shell sees it only as ``dialect.RESPONSES`` (``/v1/responses``) and ``dialect.COMPACT``
(``/v1/responses/compact``, Codex's remote compaction), registered in
``gateway.intercept.dialects``. Response ids are never rewritten: clients chain them through
``previous_response_id``.
"""
