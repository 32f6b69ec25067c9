"""Interceptors: pure per-API request parsing, stream rewriting and record extraction."""
