"""``control.convert.deliverable``: a spooled record that cannot be converted never raises.

Each payload here is synthetic: the shapes a newer daemon or a damaged row could leave.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from control.convert import deliverable
from control.spool import SpooledRecord
from control.spool_file import SpoolFile

CREATED = 1_700_000_000.25


def _rec(kind: Any, payload: dict[str, Any], **envelope: Any) -> SpooledRecord:
    fields: dict[str, Any] = {
        "seq": 9,
        "record_id": "ep:9",
        "kind": kind,
        "interception_id": "intc-1",
        "created_at": CREATED,
        "payload": {"kind": kind, **payload},
    }
    fields.update(envelope)
    return SpooledRecord(**fields)


def test_converted_record_has_no_reason() -> None:
    out, reason, detail = deliverable(_rec("prompt_usage", {"prompt": "hi"}))
    assert (out.WhichOneof("record"), reason, detail) == ("prompt_usage", "", "")


def test_unknown_kind_is_delivered_with_its_payload() -> None:
    out, reason, detail = deliverable(_rec("sandbox_usage", {"seconds": 3}))
    assert (reason, detail) == ("unknown_kind", "unknown kind 'sandbox_usage'")
    assert (out.seq, out.record_id, out.interception_id) == (9, "ep:9", "intc-1")
    assert out.created_at.ToMicroseconds() == 1_700_000_000_250_000
    assert out.unknown.kind == "sandbox_usage"
    assert out.unknown.reason == "unknown_kind"
    assert orjson.loads(out.unknown.payload) == {"kind": "sandbox_usage", "seconds": 3}


@pytest.mark.parametrize(
    ("record", "detail"),
    [
        pytest.param(_rec("token_usage", {"extra": [1, 2]}), "AttributeError", id="extra-list"),
        pytest.param(_rec("token_usage", {"input": 2**63}), "ValueError", id="int64-overflow"),
        pytest.param(
            _rec("interception_started", {"actor_metadata": ["a"]}),
            "AttributeError",
            id="metadata-list",
        ),
        pytest.param(_rec("prompt_usage", {}, created_at=1e300), "ValueError", id="time-range"),
        pytest.param(_rec("prompt_usage", {}, interception_id=5), "TypeError", id="id-not-text"),
        pytest.param(_rec("", {}), "no kind", id="no-kind"),
        pytest.param(_rec(None, {}), "no kind", id="kind-null"),
    ],
)
def test_malformed_record_is_delivered_opaque(record: SpooledRecord, detail: str) -> None:
    out, reason, got_detail = deliverable(record)
    assert (reason, got_detail) == ("malformed", detail)
    assert out.WhichOneof("record") == "unknown"
    assert out.unknown.reason == "malformed"
    assert orjson.loads(out.unknown.payload) == record.payload
    assert out.seq == 9
    out.SerializeToString()  # a valid message the stream can send


@pytest.mark.parametrize(
    ("line", "kind", "detail"),
    [
        pytest.param(
            b'{"kind":"token_usage","msg_id":"m","created_at":1.5}',
            "token_usage",
            "no interception_id",
            id="no-interception-id",
        ),
        pytest.param(
            b'{"kind":"token_usage","interception_id":7,"created_at":1.5}',
            "token_usage",
            "interception_id not text",
            id="interception-id-number",
        ),
        pytest.param(
            b'{"kind":"tool_usage","interception_id":"i","created_at":"x"}',
            "tool_usage",
            "bad time stamp",
            id="time-not-a-number",
        ),
        pytest.param(
            b'{"kind":"interception_ended","interception_id":"i","ended_at":[1]}',
            "interception_ended",
            "bad time stamp",
            id="time-a-list",
        ),
        pytest.param(b'{"kind":3,"interception_id":"i"}', "", "no kind", id="kind-number"),
        pytest.param(b"[1, 2]", "", "not a JSON object", id="json-array"),
        pytest.param(b'{"kind":,"interception_id":"i"}', "", "not a JSON object", id="not-json"),
    ],
)
def test_a_line_the_spool_cannot_read_whole_goes_out_as_stored(
    tmp_path: Path, line: bytes, kind: str, detail: str
) -> None:
    """What could be read is kept (the kind), and the payload is the line as stored."""
    file, *_ = SpoolFile.open(tmp_path / "spool.db")
    try:
        file.insert([(1, CREATED, [line])])
        (rec,) = file.select(0, 10, 1)
    finally:
        file.close()
    out, reason, got_detail = deliverable(rec)
    assert (reason, got_detail) == ("malformed", detail)
    assert (out.unknown.kind, out.unknown.reason) == (kind, "malformed")
    assert out.unknown.payload == line
    assert out.record_id == rec.record_id and out.seq == 1
    out.SerializeToString()
