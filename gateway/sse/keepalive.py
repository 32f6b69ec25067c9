"""Keep-alive frames per dialect (pure constants)."""

# Anthropic's own ping event: its SDKs skip it, so it is invisible to clients.
ANTHROPIC_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
