"""Injected tool ids and the allow/deny filter (pure)."""

from __future__ import annotations

import hashlib
import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.tools.naming import ToolCatalog, ToolRef, allowed

VALID_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def ref(server: str, name: str) -> ToolRef:
    return ToolRef(server, f"http://{server}.invalid/mcp", name, f"{name} tool", {})


def ids(catalog: ToolCatalog) -> list[str]:
    return [tool_id for tool_id, _ in catalog.tools]


def suffix(server: str, name: str) -> str:
    return hashlib.sha256(f"{server}\0{name}".encode()).hexdigest()[:8]


@pytest.mark.parametrize(
    ("server", "name", "expected"),
    [
        ("coder", "list_workspaces", "bmcp_coder_list_workspaces"),
        ("git-hub", "create-issue", "bmcp_git-hub_create-issue"),
        ("gh", "repo.get", "bmcp_gh_repo_get"),
        ("my server", "do thing", "bmcp_my_server_do_thing"),
        ("srv", "héllo wörld", "bmcp_srv_h_llo_w_rld"),
        ("srv", "名前", "bmcp_srv___"),
        ("srv", "a/b:c@d", "bmcp_srv_a_b_c_d"),
        ("", "", "bmcp__"),
    ],
)
def test_sanitising(server: str, name: str, expected: str) -> None:
    catalog = ToolCatalog([ref(server, name)])
    assert ids(catalog) == [expected]
    assert catalog.lookup(expected) == ref(server, name)


def test_exactly_64_characters_is_kept() -> None:
    name = "t" * (64 - len("bmcp_s_"))
    catalog = ToolCatalog([ref("s", name)])
    assert ids(catalog) == [f"bmcp_s_{name}"]
    assert len(ids(catalog)[0]) == 64


def test_over_64_characters_is_truncated_with_hash() -> None:
    name = "t" * (65 - len("bmcp_s_"))
    (tool_id,) = ids(ToolCatalog([ref("s", name)]))
    assert len(tool_id) == 64
    assert tool_id == f"bmcp_s_{name}"[:55] + "_" + suffix("s", name)


def test_long_names_sharing_a_prefix_stay_distinct() -> None:
    catalog = ToolCatalog([ref("s", "x" * 80 + "1"), ref("s", "x" * 80 + "2")])
    first, second = ids(catalog)
    assert first != second
    assert first[:55] == second[:55]
    assert catalog.lookup(first) is not None and catalog.lookup(second) is not None


def test_collision_after_sanitising_gets_a_hash() -> None:
    # "a.b" sorts before "a_b", so it keeps the plain id and "a_b" is disambiguated.
    catalog = ToolCatalog([ref("s", "a_b"), ref("s", "a.b")])
    plain = "bmcp_s_a_b"
    hashed = f"{plain}_{suffix('s', 'a_b')}"
    assert ids(catalog) == [plain, hashed]
    assert catalog.lookup(plain) == ref("s", "a.b")
    assert catalog.lookup(hashed) == ref("s", "a_b")


def test_collision_between_server_and_tool_boundaries() -> None:
    catalog = ToolCatalog([ref("a_b", "c"), ref("a", "b_c")])
    assert len(set(ids(catalog))) == 2
    assert catalog.lookup("bmcp_a_b_c") == ref("a", "b_c")


def test_plain_id_equal_to_a_hashed_id_is_rehashed() -> None:
    hashed = f"bmcp_s_a_b_{suffix('s', 'a_b')}"
    tricky = hashed.removeprefix("bmcp_s_")
    catalog = ToolCatalog([ref("s", "a.b"), ref("s", "a_b"), ref("s", tricky)])
    assert len(set(ids(catalog))) == 3
    for tool_id, tool in catalog.tools:
        assert catalog.lookup(tool_id) is tool


def test_order_independent_and_sorted_by_id() -> None:
    refs = [ref("zeta", "b"), ref("alpha", "z"), ref("s", "a.b"), ref("s", "a_b"), ref("m", "x")]
    forward, backward = ToolCatalog(refs), ToolCatalog(reversed(refs))
    assert forward.tools == backward.tools
    assert ids(forward) == sorted(ids(forward))


def test_lookup_unknown_and_container_protocol() -> None:
    catalog = ToolCatalog([ref("s", "t")])
    assert catalog.lookup("bmcp_s_x") is None
    assert catalog.lookup("t") is None
    assert len(catalog) == 1 and catalog
    assert list(catalog) == list(catalog.tools)
    empty = ToolCatalog([])
    assert not empty and len(empty) == 0 and empty.tools == ()


def test_duplicate_tool_is_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate tool"):
        ToolCatalog([ref("s", "t"), ref("s", "t")])


pairs = st.lists(st.tuples(st.text(max_size=80), st.text(max_size=80)), unique=True, max_size=20)


@given(pairs)
def test_ids_are_valid_unique_and_reversible(items: list[tuple[str, str]]) -> None:
    refs = [ref(server, name) for server, name in items]
    catalog = ToolCatalog(refs)
    assert len(catalog) == len(refs)
    assert len(set(ids(catalog))) == len(refs)
    assert ids(catalog) == sorted(ids(catalog))
    for tool_id, tool in catalog.tools:
        assert VALID_ID.match(tool_id), tool_id
        assert catalog.lookup(tool_id) is tool
    assert {(t.server_id, t.name) for _, t in catalog.tools} == set(items)


@given(pairs, st.randoms())
def test_ids_do_not_depend_on_input_order(items: list[tuple[str, str]], rnd: random.Random) -> None:
    shuffled = list(items)
    rnd.shuffle(shuffled)
    first = ToolCatalog(ref(s, n) for s, n in items)
    second = ToolCatalog(ref(s, n) for s, n in shuffled)
    assert first.tools == second.tools


NAMES = ["tool1", "tool2", "tool3", "api_read", "api_write", "api_sensitive", "foo1", "bar1"]


@pytest.mark.parametrize(
    ("allow", "deny", "expected"),
    [
        (None, None, NAMES),
        ("tool[12]", None, ["tool1", "tool2"]),
        (None, ".*", []),
        ("^api_.*", ".*_sensitive$", ["api_read", "api_write"]),
        ("^foo", "^bar", ["foo1"]),
        ("tool", "tool", []),
        ("TOOL", None, []),
        ("ool", None, ["tool1", "tool2", "tool3"]),
    ],
)
def test_allow_deny(allow: str | None, deny: str | None, expected: list[str]) -> None:
    allow_re = re.compile(allow) if allow is not None else None
    deny_re = re.compile(deny) if deny is not None else None
    assert [name for name in NAMES if allowed(name, allow_re, deny_re)] == expected


@pytest.mark.parametrize(
    ("name", "allow", "expected"),
    [
        ("tool.v2", re.escape("tool.v2"), True),
        ("toolXv2", re.escape("tool.v2"), False),
        ("a+b(c)", re.escape("a+b(c)"), True),
        ("[x]*", re.escape("[x]"), True),
        ("über tool", "über", True),
        ("get data", r"\s", True),
    ],
)
def test_allow_with_metacharacters_and_unicode(name: str, allow: str, expected: bool) -> None:
    assert allowed(name, re.compile(allow), None) is expected
