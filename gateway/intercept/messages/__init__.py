"""Anthropic Messages API: request parsing, stream rewriting, blocking responses (pure).

The shell sees it only as ``dialect.MESSAGES``, registered in ``gateway.intercept.dialects``.
"""
