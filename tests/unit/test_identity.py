"""Unit tests for gateway.identity."""

from __future__ import annotations

import hashlib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.identity import (
    client_session_id,
    detect_client,
    extract_bearer,
    mask_secret,
    sha256_hex,
)

# --- mask_secret -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        ("", ""),
        ("x", "..."),
        ("ab", "..."),
        ("abcd", "..."),
        ("short", "s...t"),
        ("veryshort", "v...t"),
        ("abcdefghij", "ab...ij"),
        ("thisisquitelong", "th...ng"),
        ("abcdefghijklmnopqrs", "ab...rs"),
        ("abcdefghijklmnopqrst", "abcd...qrst"),
        ("sk-ant-api03-abcdefgh", "sk-a...efgh"),
        ("hélloworld🌍!", "hé...🌍!"),
        ("ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefgh", "ghp_...efgh"),
        ("user-api-key", "us...ey"),
        ("test-key", "t...y"),
    ],
)
def test_mask_secret(secret: str, expected: str) -> None:
    assert mask_secret(secret) == expected


@given(st.text(min_size=12))
def test_mask_secret_never_reveals_middle(secret: str) -> None:
    masked = mask_secret(secret)
    assert len(masked) <= 2 * 4 + 3
    # Both ends reveal the same count, so the output length pins it down exactly; this avoids
    # mis-splitting when the secret itself contains "...".
    reveal, odd = divmod(len(masked) - 3, 2)
    assert odd == 0
    assert 2 * reveal < len(secret)
    assert masked == secret[:reveal] + "..." + secret[len(secret) - reveal :]


# --- sha256_hex --------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["", "abc", "sk-ant-api03-abcdefgh", "hélloworld🌍!"])
def test_sha256_hex(secret: str) -> None:
    assert sha256_hex(secret) == hashlib.sha256(secret.encode()).hexdigest()


def test_sha256_hex_known_vector() -> None:
    assert sha256_hex("abc") == ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


# --- extract_bearer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ""),
        ("", ""),
        ("   ", ""),
        ("Bearer tok", "tok"),
        ("bearer tok", "tok"),
        ("BEARER tok", "tok"),
        ("  Bearer   tok  ", "tok"),
        ("Bearer\ttok", "tok"),
        ("\tBearer\t\ttok\t", "tok"),
        ("Bearer", ""),
        ("Bearer ", ""),
        ("Bearer a b", ""),
        ("Basic dXNlcjpwYXNz", ""),
        ("tok", ""),
        ("Bearertok", ""),
    ],
)
def test_extract_bearer(value: str | None, expected: str) -> None:
    assert extract_bearer(value) == expected


# --- detect_client -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"User-Agent": "mux/0.1"}, "Mux"),
        ({"User-Agent": "claude-cli/1.0.0 (external, cli)"}, "Claude Code"),
        ({"User-Agent": "Claude-Code/2"}, "Claude Code"),
        ({"User-Agent": "codex_cli_rs/0.1"}, "Codex"),
        ({"User-Agent": "Zed/0.200"}, "Zed"),
        ({"User-Agent": "GitHubCopilotChat/0.30"}, "GitHub Copilot (VS Code)"),
        ({"User-Agent": "copilot/1.0"}, "GitHub Copilot (CLI)"),
        ({"User-Agent": "Kilo-Code/4.0"}, "Kilo Code"),
        ({"User-Agent": "node", "Originator": "kilo-code"}, "Kilo Code"),
        ({"User-Agent": "roo-code/3.0"}, "Roo Code"),
        ({"Originator": "roo-code"}, "Roo Code"),
        ({"User-Agent": "coder-agents/1"}, "Coder Agents"),
        ({"User-Agent": "Charm Crush/0.1"}, "Charm Crush"),
        ({"User-Agent": "node", "X-Cursor-Client-Version": "1.5"}, "Cursor"),
        (
            {"User-Agent": "OpenAI/Python 3.57.0", "X-Stainless-Lang": "python"},
            "OpenAI SDK (python)",
        ),
        ({"User-Agent": "OpenAI/JS 6.1.0", "X-Stainless-Lang": "js"}, "OpenAI SDK (js)"),
        (
            {"User-Agent": "Anthropic/Python 2.1", "X-Stainless-Lang": "python"},
            "Anthropic SDK (python)",
        ),
        # Synthetic: a stainless header alone, or a language that is not a word, names no SDK.
        ({"User-Agent": "curl/8.0", "X-Stainless-Lang": "python"}, "Unknown"),
        ({"User-Agent": "OpenAI/Python 3", "X-Stainless-Lang": "py thon"}, "Unknown"),
        ({"X-Cursor-Client-Version": ""}, "Unknown"),
        ({"X-Cursor-Client-Version": "   "}, "Unknown"),
        ({"Originator": "Kilo-Code"}, "Unknown"),
        ({"Originator": "kilo-code-extra"}, "Unknown"),
        ({"User-Agent": ""}, "Unknown"),
        ({}, "Unknown"),
        ({"User-Agent": "ccclaude-cli/1.0"}, "Unknown"),
        ({"User-Agent": "curl/8.0"}, "Unknown"),
        ({"User-Agent": "zed"}, "Unknown"),
        # User-Agent outranks Originator and Cursor's header.
        ({"User-Agent": "mux/1", "Originator": "roo-code"}, "Mux"),
        ({"User-Agent": "zed/1", "X-Cursor-Client-Version": "1"}, "Zed"),
        # Originator outranks Cursor's header.
        ({"Originator": "kilo-code", "X-Cursor-Client-Version": "1"}, "Kilo Code"),
    ],
)
def test_detect_client(headers: dict[str, str], expected: str) -> None:
    assert detect_client(headers) == expected
    assert detect_client(CIMultiDict(headers)) == expected


@pytest.mark.parametrize(
    "headers",
    [
        {"user-agent": "Mux/1"},
        {"USER-AGENT": "mux/1"},
        CIMultiDict({"uSeR-aGeNt": "MUX/1"}),
    ],
)
def test_detect_client_header_case_insensitive(headers: dict[str, str]) -> None:
    assert detect_client(headers) == "Mux"


def test_detect_client_cursor_case_insensitive() -> None:
    assert detect_client({"x-cursor-client-version": "2"}) == "Cursor"
    assert detect_client({"ORIGINATOR": "roo-code"}) == "Roo Code"


# --- client_session_id -------------------------------------------------------------------

_ALL_SESSION_HEADERS = {
    "X-Claude-Code-Session-Id": "claude-sess",
    "session_id": "codex-sess",
    "X-Mux-Workspace-Id": "mux-ws",
    "x-interaction-id": "vscode-int",
    "X-Client-Session-Id": "cli-sess",
    "X-KILOCODE-TASKID": "kilo-task",
    "X-Coder-Chat-Id": "coder-chat",
}


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("Claude Code", "claude-sess"),
        ("Codex", "codex-sess"),
        ("Mux", "mux-ws"),
        ("GitHub Copilot (VS Code)", "vscode-int"),
        ("GitHub Copilot (CLI)", "cli-sess"),
        ("Kilo Code", "kilo-task"),
        ("Coder Agents", "coder-chat"),
        ("Zed", None),
        ("Roo Code", None),
        ("Cursor", None),
        ("Charm Crush", None),
        ("Unknown", None),
    ],
)
def test_client_session_id_headers(client: str, expected: str | None) -> None:
    assert client_session_id(client, _ALL_SESSION_HEADERS, None) == expected
    assert client_session_id(client, CIMultiDict(_ALL_SESSION_HEADERS), None) == expected


@pytest.mark.parametrize(
    ("client", "header"),
    [
        ("Claude Code", "x-claude-code-session-id"),
        ("Codex", "SESSION_ID"),
        ("Codex", "Session-Id"),
        ("Mux", "x-mux-workspace-id"),
        ("GitHub Copilot (VS Code)", "X-Interaction-Id"),
        ("GitHub Copilot (CLI)", "x-client-session-id"),
        ("Kilo Code", "x-kilocode-taskid"),
        ("Coder Agents", "x-coder-chat-id"),
    ],
)
def test_client_session_id_header_case_and_trim(client: str, header: str) -> None:
    assert client_session_id(client, {header: "  abc  "}, None) == "abc"
    assert client_session_id(client, CIMultiDict({header: "\tabc\t"}), None) == "abc"
    assert client_session_id(client, {header: ""}, None) is None
    assert client_session_id(client, {header: "   "}, None) is None
    assert client_session_id(client, {}, None) is None


def _claude_body(user_id: object) -> dict[str, object]:
    return {"model": "claude", "metadata": {"user_id": user_id}}


_LEGACY = "user_abc123_account_acct-1_session_4f1c2d3e-0000-1111-2222-333344445555"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (None, None),
        ({}, None),
        ({"metadata": None}, None),
        ({"metadata": "user_x_session_y"}, None),
        ({"metadata": {}}, None),
        (_claude_body(None), None),
        (_claude_body(123), None),
        (_claude_body(["user_a_session_b"]), None),
        (_claude_body({"session_id": "s"}), None),
        (_claude_body(""), None),
        (_claude_body(orjson.dumps({"session_id": "sess-json"}).decode()), "sess-json"),
        (_claude_body(orjson.dumps({"session_id": "  padded  "}).decode()), "padded"),
        (_claude_body(orjson.dumps({"session_id": ""}).decode()), None),
        (_claude_body(orjson.dumps({"session_id": "   "}).decode()), None),
        (_claude_body(orjson.dumps({"session_id": 42}).decode()), None),
        (_claude_body(orjson.dumps({"session_id": None}).decode()), None),
        (
            _claude_body(orjson.dumps({"device_id": "d", "session_id": "s1"}).decode()),
            "s1",
        ),
        (_claude_body(orjson.dumps({"device_id": "d"}).decode()), None),
        (_claude_body(orjson.dumps(["session_id"]).decode()), None),
        (_claude_body("{not json"), None),
        (_claude_body("\ud800"), None),
        (_claude_body(_LEGACY), "4f1c2d3e-0000-1111-2222-333344445555"),
        (_claude_body("user_a_account_b_session_first_session_second"), "first_session_second"),
        (_claude_body("user_a_account_b_session_"), None),
        (_claude_body("user_a_account_b_session_   "), None),
        (_claude_body("user_a_account_b"), None),
    ],
)
def test_client_session_id_claude_body(
    body: dict[str, object] | None, expected: str | None
) -> None:
    assert client_session_id("Claude Code", {}, body) == expected


def test_client_session_id_claude_header_wins_over_body() -> None:
    body = _claude_body(_LEGACY)
    headers = CIMultiDict({"x-claude-code-session-id": " from-header "})
    assert client_session_id("Claude Code", headers, body) == "from-header"


def test_client_session_id_claude_blank_header_falls_back_to_body() -> None:
    body = _claude_body(orjson.dumps({"session_id": "from-body"}).decode())
    headers = {"X-Claude-Code-Session-Id": "   "}
    assert client_session_id("Claude Code", headers, body) == "from-body"


def test_client_session_id_body_ignored_for_other_clients() -> None:
    body = _claude_body(_LEGACY)
    assert client_session_id("Codex", {}, body) is None
    assert client_session_id("Unknown", {}, body) is None
