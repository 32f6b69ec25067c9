"""Server-sent events: incremental framing on bytes (pure, no I/O)."""

from gateway.sse.framing import Frame, FrameTooLarge, SSEFramer, encode

__all__ = ["Frame", "FrameTooLarge", "SSEFramer", "encode"]
