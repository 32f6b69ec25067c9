"""OpenAI Chat Completions API: request parsing, stream rewriting, blocking responses (pure).

The shell sees it only as ``dialect.CHAT``, registered in ``gateway.intercept.dialects``.
"""
