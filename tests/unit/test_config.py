"""Unit tests for gateway.config: settings sources, validation, secrets kept out of repr."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from pydantic import ValidationError

from gateway.config import ConfigError, Settings, describe_invalid, load_settings
from gateway.state import Snapshot, unset_key_envs

PROVIDER_SECRET = "sk-ant-provider-secret-0123456789"
CLIENT_SECRET = "gw-client-secret-abcdefghij"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AIBRIDGED_"):
            monkeypatch.delenv(name)


def _yaml(tmp_path: Path, content: dict[str, Any]) -> Path:
    path = tmp_path / "aibridged.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


# -- precedence -------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings()
    assert settings.listen == "127.0.0.1:8080"
    assert settings.ping_interval == 10.0
    assert settings.log_level == "info"
    assert settings.on_client_disconnect == "drain"
    assert [(p.name, p.type, p.base_url) for p in settings.providers] == [
        ("anthropic", "anthropic", "https://api.anthropic.com"),
        ("openai", "openai", "https://api.openai.com/v1"),
    ]
    assert settings.api_keys == []


def test_precedence_defaults_file_env_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _yaml(
        tmp_path,
        {
            "listen": "127.0.0.1:9001",
            "control_listen": "127.0.0.1:9101",
            "metrics_listen": "127.0.0.1:9201",
            "ping_interval": 3.5,
        },
    )
    # File over defaults.
    settings = load_settings(config)
    assert settings.listen == "127.0.0.1:9001"
    assert settings.control_listen == "127.0.0.1:9101"
    assert settings.metrics_listen == "127.0.0.1:9201"
    assert settings.ping_interval == 3.5
    assert settings.shutdown_grace == 30.0  # untouched default

    # Environment over file.
    monkeypatch.setenv("AIBRIDGED_LISTEN", "127.0.0.1:9002")
    monkeypatch.setenv("AIBRIDGED_CONTROL_LISTEN", "127.0.0.1:9102")
    monkeypatch.setenv("AIBRIDGED_SHUTDOWN_GRACE", "5")
    settings = load_settings(config)
    assert settings.listen == "127.0.0.1:9002"
    assert settings.control_listen == "127.0.0.1:9102"
    assert settings.metrics_listen == "127.0.0.1:9201"
    assert settings.ping_interval == 3.5
    assert settings.shutdown_grace == 5.0

    # Overrides (flags) over environment.
    settings = load_settings(config, listen="127.0.0.1:9003")
    assert settings.listen == "127.0.0.1:9003"
    assert settings.control_listen == "127.0.0.1:9102"
    assert settings.metrics_listen == "127.0.0.1:9201"


def test_env_over_defaults_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIBRIDGED_LOG_LEVEL", "debug")
    monkeypatch.setenv("AIBRIDGED_ALLOW_BYOK", "false")
    settings = load_settings()
    assert settings.log_level == "debug"
    assert settings.allow_byok is False
    assert load_settings(None, log_level="error").log_level == "error"


def test_file_path_does_not_leak_into_later_loads(tmp_path: Path) -> None:
    config = _yaml(tmp_path, {"listen": "127.0.0.1:9009"})
    assert load_settings(config).listen == "127.0.0.1:9009"
    assert load_settings().listen == "127.0.0.1:8080"
    assert Settings().listen == "127.0.0.1:8080"


def test_providers_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIBRIDGED_PROVIDERS",
        orjson.dumps([{"name": "oa", "type": "openai"}]).decode(),
    )
    settings = load_settings()
    assert [(p.name, p.base_url) for p in settings.providers] == [
        ("oa", "https://api.openai.com/v1")
    ]


# -- providers and keys -----------------------------------------------------------------------


def test_providers_from_yaml_with_api_key_env(tmp_path: Path) -> None:
    config = _yaml(
        tmp_path,
        {
            "providers": [
                {"name": "claude", "type": "anthropic", "api_key_env": "MY_CLAUDE_KEY"},
                {"name": "oa", "type": "openai"},
                {
                    "name": "local-proxy",
                    "type": "anthropic",
                    "base_url": "http://127.0.0.1:9999/",
                    "api_key": PROVIDER_SECRET,
                    "send_actor_headers": True,
                },
            ],
            "api_keys": [
                {"key": CLIENT_SECRET, "actor_id": "u-1", "username": "alice"},
                {"key_sha256": "AB" * 32, "actor_id": "u-2", "key_id": "bob-key"},
            ],
        },
    )
    settings = load_settings(config)
    snapshot = Snapshot.from_settings(
        settings,
        environ={
            "MY_CLAUDE_KEY": "sk-claude-from-env",
            "ANTHROPIC_API_KEY": "sk-wrong-default",
            "OPENAI_API_KEY": "sk-openai-from-env",
        },
    )
    providers = snapshot.providers
    assert list(providers) == ["claude", "oa", "local-proxy"]
    assert providers["claude"].api_key == "sk-claude-from-env"
    assert providers["claude"].base_url == "https://api.anthropic.com"
    assert providers["oa"].api_key == "sk-openai-from-env"
    assert providers["oa"].base_url == "https://api.openai.com/v1"
    assert providers["local-proxy"].api_key == PROVIDER_SECRET
    assert providers["local-proxy"].base_url == "http://127.0.0.1:9999"
    assert providers["local-proxy"].send_actor_headers is True

    alice = snapshot.find_key(CLIENT_SECRET)
    assert alice is not None
    assert alice.actor.id == "u-1"
    assert alice.sha256 == hashlib.sha256(CLIENT_SECRET.encode()).hexdigest()
    assert snapshot.keys["ab" * 32].key_id == "bob-key"
    assert snapshot.find_key("not-a-key") is None
    assert not snapshot.personal_mode
    assert CLIENT_SECRET not in repr(snapshot)
    assert PROVIDER_SECRET not in repr(snapshot)


def test_missing_env_key_is_empty() -> None:
    settings = load_settings(None, providers=[{"name": "claude", "type": "anthropic"}])
    snapshot = Snapshot.from_settings(settings, environ={})
    assert snapshot.providers["claude"].api_key == ""
    assert snapshot.personal_mode


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"providers": [{"name": "x", "type": "gemini"}]}, ["providers.0.type"]),
        ({"providers": [{"name": "x", "type": "anthropic", "apikey": "k"}]}, ["apikey"]),
        ({"listen": "nope"}, ["listen", "nope"]),
        ({"control_listen": "host:port"}, ["control_listen"]),
        ({"metrics_listen": "127.0.0.1:70000"}, ["metrics_listen"]),
        (
            {"api_keys": [{"key": "k", "key_sha256": "a" * 64, "actor_id": "u-1"}]},
            ["api_keys.0", "key_sha256"],
        ),
        ({"api_keys": [{"actor_id": "u-1"}]}, ["api_keys.0", "key_sha256"]),
        ({"ping_interval": 0}, ["ping_interval"]),
        ({"on_client_disconnect": "ignore"}, ["on_client_disconnect"]),
        ({"no_such_setting": 1}, ["no_such_setting"]),
    ],
)
def test_invalid_settings_name_the_field(overrides: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ValidationError) as info:
        load_settings(None, **overrides)
    message = str(info.value)
    for needle in needles:
        assert needle in message


def test_invalid_provider_in_yaml(tmp_path: Path) -> None:
    config = _yaml(tmp_path, {"providers": [{"name": "UPPER", "type": "anthropic"}]})
    with pytest.raises(ConfigError) as info:
        Snapshot.from_settings(load_settings(config), environ={})
    assert str(info.value).startswith("invalid configuration: providers[0].name: must match")


# The state's rules are the ones a host's push goes through (control.convert): a YAML file can
# no more hold what a push would be refused for (an invalid MCP regex got through before, and
# every request then failed with 500).
_MCP = {"id": "tools", "url": "http://127.0.0.1:9000/mcp"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"mcp_servers": [_MCP, {**_MCP, "id": "t2", "tool_allow_regex": "("}]},
            "mcp_servers[1].tool_allow_regex: invalid regex: ",
        ),
        (
            {"mcp_servers": [{**_MCP, "tool_deny_regex": "[a-"}]},
            "mcp_servers[0].tool_deny_regex: invalid regex: unterminated character set",
        ),
        ({"mcp_servers": [{**_MCP, "id": "a.b"}]}, "mcp_servers[0].id: must match"),
        ({"mcp_servers": [{**_MCP, "id": ""}]}, "mcp_servers[0].id: required"),
        ({"mcp_servers": [_MCP, _MCP]}, "mcp_servers[1].id: duplicate server id 'tools'"),
        ({"mcp_servers": [{**_MCP, "url": "ws://h/mcp"}]}, "mcp_servers[0].url: malformed URL"),
        (
            {"mcp_servers": [{**_MCP, "headers": {"a b": "v"}}]},
            "mcp_servers[0].headers['a b']: invalid header name",
        ),
        (
            {"mcp_servers": [{**_MCP, "headers": {"X-Key": "v\r\nX-Evil: 1"}}]},
            "mcp_servers[0].headers['X-Key']: must not contain control characters (CR, LF, NUL...)",
        ),
        (
            {"providers": [{"name": "Bad_Name", "type": "anthropic"}]},
            "providers[0].name: must match",
        ),
        (
            {
                "providers": [
                    {"name": "dup", "type": "anthropic"},
                    {"name": "ok", "type": "openai"},
                    {"name": "dup", "type": "openai"},
                ]
            },
            "providers[2].name: duplicate provider name 'dup'",
        ),
        (
            {"providers": [{"name": "x", "type": "anthropic", "base_url": "ftp://h"}]},
            "providers[0].base_url: malformed URL: scheme must be http or https",
        ),
        (
            {"providers": [{"name": "x", "type": "anthropic", "base_url": "https://a b/"}]},
            "providers[0].base_url: malformed URL",
        ),
        (
            {"providers": [{"name": "x", "type": "anthropic", "max_retries": 11}]},
            "providers[0].max_retries",
        ),
        (
            {"providers": [{"name": "x", "type": "anthropic", "api_key": "k\r\nX: y"}]},
            "providers[0].api_key: must not contain control characters (CR, LF, NUL...)",
        ),
        (
            {"api_keys": [{"key_sha256": "xyz", "actor_id": "u-1"}]},
            "api_keys[0].key_sha256: must be 64 hex characters",
        ),
        (
            {"api_keys": [{"key": "k1", "actor_id": "u-1"}, {"key": "k1", "actor_id": "u-2"}]},
            "api_keys[1].key_sha256: duplicate of api_keys[0]",
        ),
        ({"api_keys": [{"key": "k1", "actor_id": ""}]}, "api_keys[0].actor_id: required"),
    ],
)
def test_state_from_yaml_follows_the_push_rules(overrides: dict[str, Any], message: str) -> None:
    settings = load_settings(None, **overrides)
    with pytest.raises(ConfigError) as info:
        Snapshot.from_settings(settings, environ={})
    assert str(info.value).startswith(f"invalid configuration: {message}")
    assert "\n" not in str(info.value)


def test_state_errors_never_echo_a_secret() -> None:
    settings = load_settings(
        None, providers=[{"name": "x", "type": "anthropic", "api_key": "s3cret\r\n"}]
    )
    with pytest.raises(ConfigError) as info:
        Snapshot.from_settings(settings, environ={})
    assert "s3cret" not in str(info.value)


def test_central_key_from_env_is_stripped_and_checked() -> None:
    settings = load_settings(None, providers=[{"name": "x", "type": "anthropic"}])
    snapshot = Snapshot.from_settings(settings, environ={"ANTHROPIC_API_KEY": "sk-from-file\n"})
    assert snapshot.providers["x"].api_key == "sk-from-file"
    with pytest.raises(ConfigError, match=r"providers\[0\]\.api_key: must not contain control"):
        Snapshot.from_settings(settings, environ={"ANTHROPIC_API_KEY": "sk\r\nX-Evil: 1"})


def test_unset_key_envs() -> None:
    settings = load_settings(
        None,
        providers=[
            {"name": "a", "type": "anthropic", "api_key_env": "MY_KEY"},
            {"name": "b", "type": "anthropic"},
            {"name": "c", "type": "openai", "api_key": "sk-inline"},
            {"name": "d", "type": "openai"},
        ],
    )
    environ = {"ANTHROPIC_API_KEY": "sk-set", "OPENAI_API_KEY": " "}
    assert unset_key_envs(settings, environ) == {"a": "MY_KEY", "d": "OPENAI_API_KEY"}


# -- one-line errors --------------------------------------------------------------------------


def test_validation_error_is_one_line_naming_each_setting() -> None:
    with pytest.raises(ValidationError) as info:
        load_settings(
            None,
            listen="nope",
            providers=[{"name": "x", "type": "gemini", "api_key": "sk-secret-value"}],
        )
    line = describe_invalid(info.value)
    assert "\n" not in line
    assert line.startswith("invalid configuration: ")
    assert "listen: 'nope' is not HOST:PORT" in line
    assert "providers[0].type: " in line
    assert "sk-secret-value" not in line


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: [\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"invalid configuration: {path}: not valid YAML at line 2")
    assert "\n" not in str(info.value)


def test_bad_json_in_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIBRIDGED_PROVIDERS", '[{"api_key": "sk-secret-value",')
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("invalid configuration: AIBRIDGED_PROVIDERS: not valid JSON")
    assert "sk-secret-value" not in str(info.value)


def test_control_token_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^control_token_file: cannot read .*absent"):
        load_settings(None, control_token_file=tmp_path / "absent").control_bearer()
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ConfigError, match=r"^control_token_file: .*empty is empty$"):
        load_settings(None, control_token_file=empty).control_bearer()
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    assert load_settings(None, control_token_file=token).control_bearer() == "t0ken"


def test_bad_listen_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIBRIDGED_LISTEN", "nope")
    with pytest.raises(ValidationError) as info:
        load_settings()
    assert "listen" in str(info.value)


@pytest.mark.parametrize("listen", ["unix:/run/aibridged.sock", "[::1]:8080", "0.0.0.0:0"])
def test_valid_listen_forms(listen: str) -> None:
    assert load_settings(None, listen=listen).listen == listen


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(info.value)


# -- secrets ----------------------------------------------------------------------------------


def test_repr_hides_secrets(tmp_path: Path) -> None:
    config = _yaml(
        tmp_path,
        {
            "providers": [{"name": "anthropic", "type": "anthropic", "api_key": PROVIDER_SECRET}],
            "api_keys": [{"key": CLIENT_SECRET, "actor_id": "u-1"}],
        },
    )
    settings = load_settings(config)
    assert settings.providers[0].api_key == PROVIDER_SECRET
    assert settings.api_keys[0].key == CLIENT_SECRET
    for text in (repr(settings), str(settings), repr(settings.providers), repr(settings.api_keys)):
        assert PROVIDER_SECRET not in text
        assert CLIENT_SECRET not in text
    assert "u-1" in repr(settings)


def test_the_readme_example_file_is_a_valid_configuration(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = readme.split("Example file:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "aibridged.yaml"
    # The one placeholder a reader fills in.
    path.write_text(example.replace("<sha256 hex of bob's key>", hashlib.sha256(b"b").hexdigest()))
    settings = load_settings(path)
    snap = Snapshot.from_settings(settings, environ={})
    assert {name: p.type for name, p in snap.providers.items()} == {
        "anthropic": "anthropic",
        "openai": "openai",
        "openrouter": "openai",
    }
    assert snap.providers["openrouter"].url("/chat/completions") == (
        "https://openrouter.ai/api/v1/chat/completions"
    )
