"""Anthropic Messages API: request parsing, stream rewriting, blocking responses (pure)."""
