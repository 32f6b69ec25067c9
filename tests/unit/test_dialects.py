"""The route table: what is registered, and the registrations it refuses at startup."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.intercept.chat.dialect import CHAT
from gateway.intercept.dialects import DIALECTS, UNROUTED, provider_apis, route_table
from gateway.intercept.messages.dialect import ANTHROPIC, MESSAGES
from gateway.intercept.openai.provider import OPENAI
from gateway.intercept.responses.dialect import COMPACT, RESPONSES


def test_every_dialect_is_registered_under_its_provider_type_and_path() -> None:
    assert DIALECTS == {
        ("anthropic", "/v1/messages"): MESSAGES,
        ("openai", "/v1/chat/completions"): CHAT,
        ("openai", "/v1/responses"): RESPONSES,
        ("openai", "/v1/responses/compact"): COMPACT,
    }
    assert provider_apis(DIALECTS) == {"anthropic": ANTHROPIC, "openai": OPENAI}
    # Upstream, OpenAI paths follow a base URL that holds the version; Anthropic's do not.
    assert [d.upstream_path for d in DIALECTS.values()] == [
        "/v1/messages",
        "/chat/completions",
        "/responses",
        "/responses/compact",
    ]
    # Requests no route serves keep the shape they always had.
    assert UNROUTED is ANTHROPIC


def test_two_dialects_on_one_path_are_refused() -> None:
    # Synthetic: a second dialect of another provider type on the same path.
    other = dataclasses.replace(
        MESSAGES, name="other", provider=dataclasses.replace(ANTHROPIC, type="openai")
    )
    with pytest.raises(ValueError, match="other and messages both intercept /v1/messages"):
        route_table([MESSAGES, other])


def test_one_provider_type_has_one_provider_api() -> None:
    # Synthetic: two dialects of one type that disagree on what the type shares.
    other = dataclasses.replace(
        MESSAGES, name="other", path="/v1/other", provider=dataclasses.replace(ANTHROPIC)
    )
    with pytest.raises(ValueError, match="provider type anthropic has two ProviderApi objects"):
        provider_apis(route_table([MESSAGES, other]))
