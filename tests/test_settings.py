"""Settings from the environment and .env: defaults, validation, typos, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.errors import ConfigError
from newsletter.settings import PREVIEW_KEY, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("NEWSLETTER_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults_work_without_any_configuration() -> None:
    s = load_settings()
    assert s.public_url == "https://news.example.org"
    assert (s.sender_name, s.sender_address) == ("MS Research News", "news@example.org")
    assert s.unsubscribe_address == "unsubscribe@example.org"
    assert s.token_key == PREVIEW_KEY


def test_environment_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "NEWSLETTER_FROM=Research News <news@ms.example.net>\n"
        "NEWSLETTER_SECRET_KEY=s3cret-value-that-is-long-enough-0123\n"
        "NEWSLETTER_PUBLIC_URL=https://news.ms.example.net/\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("NEWSLETTER_LIST_NAME", "weekly")
    s = load_settings()
    assert s.sender_address == "news@ms.example.net"
    assert s.public_url == "https://news.ms.example.net"
    assert s.list_name == "weekly"
    assert s.token_key == b"s3cret-value-that-is-long-enough-0123"
    assert "s3cret-value-that-is-long-enough-0123" not in repr(
        s
    ) and "s3cret-value-that-is-long-enough-0123" not in str(s.model_dump())


def test_misspelt_variable_is_an_error_with_a_suggestion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSLETTER_PUBLIC_ULR", "https://x.example.org")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "NEWSLETTER_PUBLIC_ULR: not a known setting; did you mean NEWSLETTER_PUBLIC_URL?" in str(
        info.value
    )


def test_invalid_values_are_all_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSLETTER_PUBLIC_URL", "http://news.example.org")
    monkeypatch.setenv("NEWSLETTER_FROM", "not an address")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "NEWSLETTER_PUBLIC_URL: must be an https:// URL" in message
    assert "NEWSLETTER_FROM: 'not an address' is not an address" in message


def test_unknown_key_in_dotenv_is_an_error(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("NEWSLETTER_SMTP_HOTS=x\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "NEWSLETTER_SMTP_HOTS" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("NEWSLETTER_SECRET_KEY", "short", "at least 32 characters"),
        ("NEWSLETTER_PUBLIC_URL", "https://nouvelles.exämple.org", "ASCII URL"),
        ("NEWSLETTER_PUBLIC_URL", "https://news.example.org/a>b", "ASCII URL"),
        ("NEWSLETTER_LIST_NAME", "Research News", "lower-case letters"),
        ("NEWSLETTER_FROM", "News <news@exämple.org>", "must be ASCII"),
    ],
)
def test_values_that_would_break_headers_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in str(info.value) and expected in str(info.value)
