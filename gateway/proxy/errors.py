"""Gateway-side error responses, in the shape of the provider type a route belongs to.

Every route is bound to a ``ProviderApi`` at startup (``app.build_app``); what no route serves
gets ``UNROUTED``'s shape. No traceback and no HTML reach a client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from gateway.access_log import log_refused
from gateway.intercept.dialect import ProviderApi
from gateway.intercept.dialects import UNROUTED

# Failures escaping a handler are logged under the app's name (where the middleware logged them).
_app_log = logging.getLogger("aibridged.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(api: ProviderApi, status: int, message: str) -> web.Response:
    """A gateway-side error response in ``api``'s shape."""
    return web.Response(
        status=status, body=api.error_body(status, message), content_type="application/json"
    )


def route_not_found(api: ProviderApi, request: web.Request) -> web.Response:
    """The 404 for a path no route serves."""
    return error_response(api, 404, f"route not supported: {request.method} {request.path}")


def method_not_allowed(api: ProviderApi, request: web.Request) -> web.Response:
    """The 405 for a known path asked with a method it does not serve."""
    return error_response(api, 405, f"method {request.method} not allowed on {request.path}")


def _logged(request: web.Request, response: web.Response, reason: str) -> web.Response:
    # The access line of a request answered without becoming an interception.
    log_refused(request.method, request.path, request.remote, response.status, reason)
    return response


async def wrong_method(api: ProviderApi, request: web.Request) -> web.Response:
    """Handler of a known path's ``*`` route, after its methods: the 405, logged (bind
    ``api``)."""
    return _logged(request, method_not_allowed(api, request), "method not allowed")


def failure_response(
    api: ProviderApi, request: web.Request, exc: Exception, access_line: bool = True
) -> web.Response | None:
    """What the client gets for an exception escaping a handler; None to let it propagate.

    Call from the ``except`` clause (an unexpected failure is logged with its traceback). Every
    failure gets ``api``'s error shape and, unless ``access_line`` is false (an interception's
    end line already said it), an access line. Redirects and client disconnects propagate.
    """
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            return None
        if exc.status == 404:
            response, reason = route_not_found(api, request), "route not supported"
        elif exc.status == 405:
            response, reason = method_not_allowed(api, request), "method not allowed"
        else:
            response, reason = error_response(api, exc.status, exc.reason), exc.reason
    elif isinstance(exc, (ConnectionResetError, aiohttp.ClientConnectionResetError)):
        return None
    else:
        _app_log.exception("unhandled error on %s %s", request.method, request.path)
        response = error_response(api, 500, "internal gateway error")
        reason = "internal gateway error"
    return _logged(request, response, reason) if access_line else response


def provider_shaped(handler: Handler, api: ProviderApi = UNROUTED) -> Handler:
    """``handler`` with its failures answered by :func:`failure_response` (wrap once, at startup).

    Costs one coroutine per request, where an aiohttp middleware costs two.
    """

    async def shaped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            response = failure_response(api, request, exc)
            if response is None:
                raise
            return response

    return shaped
