"""The dialects the data plane serves: the route table (pure).

The one module that names dialects. A new dialect is its folder under ``gateway/intercept/`` and
one more entry in ``DIALECTS``; the shell registers its route, its provider type's passthrough
routes and error shape from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gateway.intercept.chat.dialect import CHAT
from gateway.intercept.dialect import Dialect, ProviderApi
from gateway.intercept.messages.dialect import MESSAGES
from gateway.intercept.responses.dialect import COMPACT, RESPONSES


def route_table(dialects: Iterable[Dialect]) -> dict[tuple[str, str], Dialect]:
    """``dialects`` by (provider type, path), the intercepted routes.

    A path is intercepted for one provider type only: its route (``/{provider}/<path>``) is
    bound to one dialect at startup, so a request picks no dialect.
    """
    table: dict[tuple[str, str], Dialect] = {}
    paths: dict[str, Dialect] = {}
    for dialect in dialects:
        taken = paths.setdefault(dialect.path, dialect)
        if taken is not dialect:
            raise ValueError(f"{dialect.name} and {taken.name} both intercept {dialect.path}")
        table[dialect.provider.type, dialect.path] = dialect
    return table


def provider_apis(table: Mapping[tuple[str, str], Dialect]) -> dict[str, ProviderApi]:
    """The provider types of ``table``, in order: their dialects must share one ``ProviderApi``."""
    apis: dict[str, ProviderApi] = {}
    for dialect in table.values():
        api = apis.setdefault(dialect.provider.type, dialect.provider)
        if api is not dialect.provider:
            raise ValueError(f"provider type {api.type} has two ProviderApi objects")
    return apis


DIALECTS = route_table([MESSAGES, CHAT, RESPONSES, COMPACT])

# The shape of errors on no route at all (an unknown path, a request aiohttp cannot parse), as
# the gateway has always answered them.
UNROUTED: ProviderApi = MESSAGES.provider
