"""The passthrough allow-list on raw (percent-encoded, unnormalised) request paths."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.intercept.messages.dialect import PASSTHROUGH
from gateway.intercept.passthrough_paths import reencode_query, upstream_path

ALLOWED = [
    ("GET", "/v1/models", "/v1/models"),
    ("GET", "/v1/models/claude-sonnet-4-5", "/v1/models/claude-sonnet-4-5"),
    ("GET", "/v1/models/claude-3-5-sonnet-v2@20241022", "/v1/models/claude-3-5-sonnet-v2@20241022"),
    ("GET", "/v1/models/anthropic.claude-v2:1", "/v1/models/anthropic.claude-v2:1"),
    ("GET", "/v1/models/a..b", "/v1/models/a..b"),
    ("POST", "/v1/messages/count_tokens", "/v1/messages/count_tokens"),
    # Decoded segment by segment: an encoded literal is that literal, sent upstream plainly.
    ("GET", "/v1/%6dodels/%63laude", "/v1/models/claude"),
    ("GET", "/v1/models/claude%2D4", "/v1/models/claude-4"),
]


@pytest.mark.parametrize(("method", "raw", "upstream"), ALLOWED)
def test_allowed_paths(method: str, raw: str, upstream: str) -> None:
    assert upstream_path(PASSTHROUGH, method, raw) == upstream


REFUSED = [
    # Dot segments, raw and encoded in every case mix.
    "/v1/models/../../v1/organizations/users",
    "/v1/models/..%2f..%2fv1/organizations/users",
    "/v1/models/..%2F..%2Fv1%2Forganizations%2Fusers",
    "/v1/models/%2e%2e/%2e%2e/v1/organizations/users",
    "/v1/models/%2E%2E/%2E%2E/v1/organizations/users",
    "/v1/models/.%2e/x",
    "/v1/models/%2e.",
    "/v1/models/..",
    "/v1/models/.",
    "/v1/models/%2e",
    "/v1/models/...",
    "/v1/models/.%2e.",
    "/v1/models/x/..",
    "/v1/models/x/../..",
    "/v1/x/../models",
    "/v1/./models",
    "/./v1/models",
    # An encoded slash inside an id.
    "/v1/models/a%2fb",
    "/v1/models/a%2Fb",
    "/v1/models/%2fv1%2forganizations",
    # Double encoding: decoded once, the rest stays a literal "%".
    "/v1/models/%252e%252e",
    "/v1/models/%252e%252e%252f%252e%252e%252fv1",
    "/v1/models/a%252fb",
    "/v1/models/%25",
    # Path parameters.
    "/v1/models/x;a=b",
    "/v1/models/..;",
    "/v1/models/..;/..;/v1/organizations",
    "/v1/models;/x",
    "/v1/models/%3b",
    # Backslashes, raw and encoded.
    "/v1/models/..\\..\\v1\\organizations",
    "/v1/models/a\\b",
    "/v1/models/..%5c..%5cv1",
    "/v1/models/a%5Cb",
    # Control characters.
    "/v1/models/a%00b",
    "/v1/models/a%0ab",
    "/v1/models/a%0d%0aX-Injected:%201",
    "/v1/models/a%09",
    "/v1/models/a%7f",
    "/v1/models/a\x00b",
    # Empty segments.
    "/v1/models/",
    "/v1/models//x",
    "/v1//models",
    "//v1/models",
    "/v1/models/x/",
    "",
    "/",
    "v1/models",
    # Other shapes and characters no model id holds.
    "/v1/models/a/b",
    "/v1/models/a%20b",
    "/v1/models/caf%C3%A9",
    "/v1/models/%ff",
    "/v1/models/a?b",
    "/v1/models/a%3fb",
    "/v1/models/a%23b",
    "/v1/models/" + "a" * 257,
    "/v1/organizations/users",
    "/v1/messages",
    "/V1/models",
    "/v1/models/x/y/z",
    "/v1/messages/count_tokens/x",
]


@pytest.mark.parametrize("raw", REFUSED)
def test_refused_paths(raw: str) -> None:
    assert upstream_path(PASSTHROUGH, "GET", raw) is None
    assert upstream_path(PASSTHROUGH, "POST", raw) is None


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("POST", "/v1/models"),
        ("DELETE", "/v1/models/x"),
        ("GET", "/v1/messages/count_tokens"),
        ("get", "/v1/models"),
    ],
)
def test_methods_are_part_of_the_allow_list(method: str, raw: str) -> None:
    assert upstream_path(PASSTHROUGH, method, raw) is None


@given(st.text(max_size=60))
def test_an_allowed_path_is_one_of_the_routes(tail: str) -> None:
    """Whatever the client sends, the upstream path is a listed route with one plain id."""
    for raw in (f"/v1/models/{tail}", f"/v1/{tail}", f"/{tail}"):
        got = upstream_path(PASSTHROUGH, "GET", raw)
        if got is None:
            continue
        segments = got.split("/")
        assert segments[:3] == ["", "v1", "models"]
        assert len(segments) <= 4
        for segment in segments[3:]:
            assert segment.strip(".")
            assert unquote(segment) == segment
            assert not set(segment) & set("/\\%;?#") and segment.isprintable()


QUERIES = [
    ("", ""),
    ("limit=2", "limit=2"),
    ("limit=2&after_id=claude-3", "limit=2&after_id=claude-3"),
    ("a=%2F..%2F&b=x", "a=%2F..%2F&b=x"),
    ("a=../x", "a=..%2Fx"),
    ("a=b+c", "a=b%20c"),
    ("flag", "flag="),
    ("a=%00%0d%0a", "a=%00%0D%0A"),
    ("a=%zz", "a=%25zz"),
    ("a=1;b=2", "a=1%3Bb%3D2"),
    ("a=1#frag", "a=1%23frag"),
    ("a=\\", "a=%5C"),
    ("a=%252e", "a=%252e"),
]


@pytest.mark.parametrize(("raw", "expected"), QUERIES)
def test_query_is_reencoded(raw: str, expected: str) -> None:
    got = reencode_query(raw)

    assert got == expected
    assert parse_qsl(got, keep_blank_values=True) == parse_qsl(raw, keep_blank_values=True)
