"""The data plane's I/O shell: aiohttp handlers, upstream client, relay."""
