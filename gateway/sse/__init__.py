"""Server-sent events: incremental framing and region scanning on bytes (pure, no I/O)."""

from gateway.sse.framing import Frame, FrameTooLarge, SSEFramer, encode
from gateway.sse.scan import FramePatterns, RegionScanner, ScanTarget, named_events

__all__ = [
    "Frame",
    "FramePatterns",
    "FrameTooLarge",
    "RegionScanner",
    "SSEFramer",
    "ScanTarget",
    "encode",
    "named_events",
]
