"""OpenAI's provider type: what its dialects (Chat Completions, Responses) share (pure)."""
