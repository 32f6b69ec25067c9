"""Unit tests for gateway.records helpers."""

from __future__ import annotations

import uuid

from gateway.records import new_interception_id


def test_interception_ids_are_distinct_version_4_uuids() -> None:
    ids = [new_interception_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == value
