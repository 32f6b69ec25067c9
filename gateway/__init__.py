"""aibridged: a gateway daemon for AI traffic (data plane)."""

__version__ = "0.1.0"
