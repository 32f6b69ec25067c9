"""``control.convert.deliverable``: a spooled record that cannot be converted never raises.

Each payload here is synthetic: the shapes a newer daemon or a damaged row could leave.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from control.convert import deliverable
from control.spool import SpooledRecord

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
