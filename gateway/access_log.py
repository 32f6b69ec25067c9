"""The per-request log lines: an interception's end, a refused request (logger
``aibridged.access``).

An end line costs the request path one ``%`` formatting of bytes under the daemon's JSON log
(``EventLog.add_json``), built by ``Observation.finish`` from :data:`ENDED_JSON`; every other
case (text format, an embedding application's ``logging``) goes through :func:`log_ended`, with
the same fields. The fields that repeat from request to request (provider, api, model, actor,
client, streaming) are rendered once per combination (:func:`ended_fragment`): formatting costs
by the field, and they are six of seventeen.
"""

from __future__ import annotations

from orjson import dumps

from gateway.logs import EventLog, json_template

ACCESS_LOGGER = "aibridged.access"
ACCESS = EventLog(ACCESS_LOGGER)
ENDED = "interception ended"
# Longest client-chosen text a line carries (a model name).
LOGGED_TEXT = 200

# The end line's fields, in the order of the values given to add_json and log_ended. Quoted
# "%s": ASCII text the gateway makes (ids, validated names, an end status); "%s": JSON text
# (escaped by orjson). Times in whole microseconds: formatting a float costs more than the rest
# of a field.
_ENDED_FIELDS = (
    ("interception_id", '"%s"'),
    ("provider", '"%s"'),
    ("api", '"%s"'),
    ("model", "%s"),
    ("actor_id", "%s"),
    ("client", "%s"),
    ("streaming", "%s"),
    ("status", '"%s"'),
    ("upstream_status", "%d"),
    ("error_type", "%s"),
    ("duration_us", "%d"),
    ("ttfb_us", "%d"),
    ("overhead_us", "%d"),
    ("input_tokens", "%d"),
    ("output_tokens", "%d"),
    ("cache_read_tokens", "%d"),
    ("cache_write_tokens", "%d"),
)
# After the time: the interception id, fields 2-7 in one fragment (ended_fragment), the rest.
ENDED_JSON = json_template(ACCESS_LOGGER, ENDED, (_ENDED_FIELDS[0], ("", "%s"), *_ENDED_FIELDS[7:]))
_ENDED_KEYS = tuple(key for key, _ in _ENDED_FIELDS)

# (route names, model, actor id, client, streaming) -> their fragment; bounded.
FRAGMENTS: dict[tuple[object, ...], bytes] = {}
_FRAGMENTS_MAX = 4096
_FRAGMENT = ",".join(f'"{key}":{spec}' for key, spec in _ENDED_FIELDS[1:7]).encode()


def ended_fragment(
    names: tuple[bytes, bytes], model: str, actor_id: str, client: str, streaming: bool
) -> bytes:
    """``"provider":...,"api":...,"model":...,"actor_id":...,"client":...,"streaming":...,``
    for an end line, kept in ``FRAGMENTS`` under ``(names, model, actor_id, client,
    streaming)``. Raises TypeError for text that is not UTF-8 (the caller falls back to
    :func:`log_ended`, which escapes it)."""
    fragment = _FRAGMENT % (
        *names,
        dumps(model[:LOGGED_TEXT]),
        dumps(actor_id[:LOGGED_TEXT]),
        dumps(client[:LOGGED_TEXT]),
        b"true" if streaming else b"false",
    )
    if len(FRAGMENTS) < _FRAGMENTS_MAX and max(len(model), len(actor_id)) <= LOGGED_TEXT:
        FRAGMENTS[names, model, actor_id, client, streaming] = fragment
    return fragment


# Strings end lines repeat (models, actors, clients, error types) -> their JSON text; bounded in
# number and length.
JSON_TEXTS: dict[str, bytes] = {}
_JSON_TEXTS_MAX = 4096


def json_text(value: str) -> bytes:
    """``value`` (its first ``LOGGED_TEXT`` characters) as JSON text, kept in ``JSON_TEXTS``."""
    text = dumps(value[:LOGGED_TEXT])
    if len(value) <= LOGGED_TEXT and len(JSON_TEXTS) < _JSON_TEXTS_MAX:
        JSON_TEXTS[value] = text
    return text


def log_ended(values: tuple[object, ...]) -> None:
    """The end line from plain values, in the order of ``_ENDED_FIELDS`` (INFO is enabled)."""
    line: dict[str, object] = {"time": "", "level": "INFO", "logger": ACCESS_LOGGER}
    line["message"] = ENDED
    line.update(zip(_ENDED_KEYS, values, strict=True))
    ACCESS.emit(line)


def log_refused(method: str, path: str, remote: str | None, status: int, reason: str) -> None:
    """The line of a request refused before it became an interception (401, 404, 413, ...)."""
    if ACCESS.enabled():
        ACCESS.emit(
            {
                "time": "",
                "level": "INFO",
                "logger": ACCESS_LOGGER,
                "message": "request refused",
                "status": status,
                "reason": reason[:300],
                "method": method[:20],
                "path": path[:LOGGED_TEXT],
                "remote": remote or "",
            }
        )
