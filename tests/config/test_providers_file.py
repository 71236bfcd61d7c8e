"""The providers file: entries, limits and secrets, and an error that names the key for each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from order_monitor.config import load_providers, load_settings
from order_monitor.errors import ConfigError
from tests.config.helpers import write_providers


def test_providers_file_with_secrets_from_env_file_and_credentials(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("file-token\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "znet-sifre").write_text("cred-sifre")
    env = write_providers(
        tmp_path,
        f"""
[providers.znet]
kind = "znet"
base_url = "https://panel.example.com/"
provider_ids = ["znet", 7]
[providers.znet.secrets]
kod = {{ env = "ZNET_KOD" }}
sifre = {{ credential = "znet-sifre" }}
[providers.znet.limits]
concurrency = 4
rate = 2.5

[providers.barakat]
kind = "barakat"
base_url = "https://api.barakat.example"
secrets = {{ token = {{ file = "{tmp_path / "token"}" }} }}
options = {{ chunk_size = 50 }}
""",
    )
    s = load_settings({**env, "ZNET_KOD": "env-kod", "CREDENTIALS_DIRECTORY": str(creds)})
    znet, barakat = s.providers
    assert znet.base_url == "https://panel.example.com"
    assert znet.provider_ids == ("znet", "7")
    assert znet.secrets["kod"].reveal() == "env-kod"
    assert znet.secrets["sifre"].reveal() == "cred-sifre"
    assert (znet.limits.concurrency, znet.limits.rate) == (4, 2.5)
    assert barakat.provider_ids == ("barakat",)
    assert barakat.secrets["token"].reveal() == "file-token"
    assert barakat.options == {"chunk_size": 50}
    assert s.provider_for("7") is znet
    assert s.provider_for("other") is None
    for text in (repr(s), repr(znet), str(znet.secrets)):
        assert "env-kod" not in text
        assert "cred-sifre" not in text
        assert "file-token" not in text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[providers.a]\nbase_url='https://x'", r"\[providers.a\]: 'kind' is required"),
        ("[providers.a]\nkind='znet'\nbase_url='ftp://x'", "must start with http"),
        ("[providers.a]\nkind='znet'\nbase_url='https://x'\ncolour='red'", "unknown keys"),
        (
            "[providers.a]\nkind='znet'\nbase_url='https://x'\nlimits={rate=-1}",
            r"limits.rate = -1 is invalid",
        ),
        (
            "[providers.a]\nkind='znet'\nbase_url='https://x'\nlimits={concurrency=1.5}",
            "a whole number",
        ),
        (
            "[providers.a]\nkind='znet'\nbase_url='https://x'\nsecrets={kod={env='NOPE_UNSET'}}",
            "NOPE_UNSET is not set",
        ),
        (
            "[providers.a]\nkind='znet'\nbase_url='https://x'\nsecrets={kod={vault='x'}}",
            "unknown source",
        ),
        (
            "[providers.a]\nkind='znet'\nbase_url='https://x'\n[providers.b]\nkind='znet'\nbase_url='https://y'\nprovider_ids=['a']",
            "already served by",
        ),
        ("not toml [", "not valid TOML"),
    ],
)
def test_providers_file_errors_name_the_key(tmp_path: Path, body: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings(write_providers(tmp_path, body))


def test_provider_secrets_can_be_left_unresolved_for_commands_that_ask_no_provider(
    tmp_path: Path,
) -> None:
    env = write_providers(
        tmp_path,
        "[providers.znet]\nkind='znet'\nbase_url='https://x'\nsecrets={kod={credential='k'}}",
    )
    with pytest.raises(ConfigError, match="credential 'k' is not available"):
        load_settings(env)
    (provider,) = load_settings(env, need_provider_secrets=False).providers
    assert provider.provider_ids == ("znet",)
    assert provider.secrets == {}


def test_the_readme_provider_examples_parse_and_build(tmp_path: Path) -> None:
    """The examples an operator copies must be valid: they cannot drift from the code."""
    from order_monitor.providers.registry import build_adapter

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```toml\n")[1:]]
    examples = [b for b in blocks if b.lstrip().startswith("[providers.")]
    assert len(examples) >= 2
    (tmp_path / "znet-sifre").write_text("s")
    env = {"ZNET_KOD": "k", "INTERNAL_TOKEN": "t", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    for example in examples:
        path = tmp_path / "providers.toml"
        path.write_text(example)
        for provider in load_providers(path, env):
            assert build_adapter(provider).max_batch >= 1


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "+nan"])
@pytest.mark.parametrize("key", ["rate", "connect_timeout", "read_timeout", "breaker_cooldown"])
def test_provider_limits_must_be_finite_and_positive(tmp_path: Path, key: str, value: str) -> None:
    env = write_providers(
        tmp_path, f"[providers.a]\nkind='znet'\nbase_url='https://x'\nlimits={{{key}={value}}}"
    )
    with pytest.raises(ConfigError, match=rf"limits\.{key} = .* is invalid: expected a number > 0"):
        load_settings(env)
