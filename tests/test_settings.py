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
        ("NEWSLETTER_PUBLIC_URL", "https://example.org/news?x=1", "without ?query"),
        ("NEWSLETTER_PUBLIC_URL", "https://example.org/news#top", "without ?query"),
        ("NEWSLETTER_PUBLIC_URL", "https://example.org/news?", "without ?query"),
        ("NEWSLETTER_PUBLIC_URL", "https://ed:pw@example.org/news", "user name or password"),
        ("NEWSLETTER_LIST_NAME", "Research News", "lower-case letters"),
        ("NEWSLETTER_FROM", "News <news@exämple.org>", "must be ASCII"),
        ("NEWSLETTER_SMTP_HELO_NAME", "a b\r\nMAIL FROM:<x@y.org>", "is not a host name"),
        ("NEWSLETTER_SMTP_HELO_NAME", "mail.example.org;", "is not a host name"),
        ("NEWSLETTER_SMTP_HOST", "relay\t.example.org", "is not a host name or address"),
        ("NEWSLETTER_SMTP_HOST", "relay example.org", "is not a host name or address"),
    ],
)
def test_values_that_would_break_headers_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in str(info.value) and expected in str(info.value)


# ------------------------------------------------------------ a shared .env


def test_a_dotenv_shared_with_other_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# docker compose and the database read this file too\n"
        "COMPOSE_PROJECT_NAME=charity\n"
        "POSTGRES_PASSWORD='pa ss#word'\n"
        "DATA_DIR=/srv/news\n"
        "\n"
        'export NEWSLETTER_FROM="Research News <news@ms.example.net>"   # who sends\n'
        "NEWSLETTER_LIST_NAME='weekly'\n"
        "NEWSLETTER_SMTP_HOST=relay.example.net # the relay\n"
        "NEWSLETTER_DATABASE=${DATA_DIR}/news.sqlite3\n"
        "NEWSLETTER_SMTP_PORT=2525\n"
        "NEWSLETTER_SMTP_PASSWORD='pa${ss}word'\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("NEWSLETTER_SMTP_PORT", "587")  # the environment wins over .env
    s = load_settings()
    assert s.sender_address == "news@ms.example.net" and s.sender_name == "Research News"
    assert (s.list_name, s.smtp_host, s.smtp_port) == ("weekly", "relay.example.net", 587)
    assert s.database.path == Path("/srv/news/news.sqlite3")
    assert s.smtp_password is not None and s.smtp_password.get_secret_value() == "pa${ss}word"


def test_misspelt_key_in_dotenv_gets_a_suggestion_with_its_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "POSTGRES_PASSWORD=x\nNEWSLETTER_LIST_NAME=weekly\nNEWSLETTER_SMTP_HOTS=relay\n"
        "newsletter_public_ulr=https://x.example.org\nNEWSLETTER_SMTP_PORT=many\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert (
        ".env:3: NEWSLETTER_SMTP_HOTS: not a known setting; did you mean NEWSLETTER_SMTP_HOST?"
        in message
    )
    assert (
        ".env:4: NEWSLETTER_PUBLIC_ULR: not a known setting; did you mean NEWSLETTER_PUBLIC_URL?"
        in message
    )
    assert ".env:5: NEWSLETTER_SMTP_PORT: " in message and "integer" in message
    assert "POSTGRES" not in message and "LIST_NAME" not in message


def test_broken_lines_in_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "OTHER_TOOL='never closed\n"  # someone else's problem: left alone
        '\n\nNEWSLETTER_FROM="News <news@example.org>\n'
        "NEWSLETTER_LIST_NAME\n"
        "NEWSLETTER_TEST_NOW=2026-12-03T09:00:00-05:00\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert ".env:4: cannot be read as KEY=VALUE; check its quotes" in message
    assert ".env:5: NEWSLETTER_LIST_NAME: has no value; write NEWSLETTER_LIST_NAME=VALUE" in message
    assert ".env:6: NEWSLETTER_TEST_NOW: is read from the environment only" in message
    assert "OTHER_TOOL" not in message


def test_dotenv_that_cannot_be_read(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_bytes(b"NEWSLETTER_LIST_NAME=weekly\nNEWSLETTER_FROM=Caf\xe9 <news@example.org>\n")
    with pytest.raises(ConfigError, match=r"\.env:2: is not UTF-8 text.*save it as UTF-8"):
        load_settings()
    env.unlink()
    env.mkdir()
    with pytest.raises(ConfigError, match=r"\.env: cannot be read \(Is a directory\)"):
        load_settings()
    env.rmdir()
    env.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=r"\.env: is larger than 1024 KB"):
        load_settings()
    env.unlink()
    env.symlink_to(tmp_path / "secrets" / "newsletter.env")
    with pytest.raises(ConfigError, match=r"\.env: cannot be read \(No such file or directory\)"):
        load_settings()


def test_a_quote_left_open_does_not_swallow_our_settings(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "GREETING='it is\nNEWSLETTER_LIST_NAME=weekly\nOTHER='x'\n", encoding="utf-8"
    )
    with pytest.raises(
        ConfigError,
        match=r"\.env:1: a quote opened on this line .* takes in NEWSLETTER_LIST_NAME",
    ):
        load_settings()
    # a value that really is several lines (a certificate, say) is someone else's business
    (tmp_path / ".env").write_text('CERT="-----BEGIN-----\nabc\n-----END-----"\n')
    assert load_settings().list_name == "research-news"


# ------------------------------------------------------- schedule settings


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Nowhere/Town", "'Nowhere/Town' is not a time zone name; use a zoneinfo name"),
        ("Europe/Londn", "did you mean 'Europe/London'?"),
        ("america/new_york", "did you mean 'America/New_York'?"),
        ("/etc/passwd", "is not a time zone name"),
        ("", "is not a time zone name"),
    ],
)
def test_unknown_time_zone_names_its_setting(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("NEWSLETTER_TIMEZONE", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    (line,) = [x for x in str(info.value).splitlines() if "NEWSLETTER_TIMEZONE" in x]
    assert line.startswith(f"  NEWSLETTER_TIMEZONE: {value!r} is not a time zone name")
    assert expected in line and "America/New_York" in line  # an example of what to write


def test_schedule_errors_name_their_setting_and_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "NEWSLETTER_TIMEZONE=Europe/London\nNEWSLETTER_SCHEDULE=Thursday at nine\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert ".env:2: NEWSLETTER_SCHEDULE: 'Thursday at nine' is not a schedule like" in str(
        info.value
    )


def test_a_catch_up_window_of_nothing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSLETTER_CATCH_UP_HOURS", "0")
    with pytest.raises(ConfigError, match=r"NEWSLETTER_CATCH_UP_HOURS: .*greater than 0"):
        load_settings()


def test_a_disguised_sender_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSLETTER_FROM", "MS Research \u202eswe\u202c <news@example.org>")
    with pytest.raises(ConfigError, match="NEWSLETTER_FROM: contains U\\+202E RIGHT-TO-LEFT"):
        load_settings()
    monkeypatch.setenv("NEWSLETTER_FROM", "חדשות המחקר <news@example.org>")  # Hebrew: fine
    assert load_settings().sender_name == "חדשות המחקר"


def test_dotenv_saved_with_windows_line_ends(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(
        b"\xef\xbb\xbfOTHER=1\r\nNEWSLETTER_LIST_NAME=weekly\r\nNEWSLETTER_SMTP_HOTS=x\r\n"
    )
    with pytest.raises(ConfigError, match=r"\.env:3: NEWSLETTER_SMTP_HOTS: not a known"):
        load_settings()
    (tmp_path / ".env").write_bytes(b"\xef\xbb\xbfNEWSLETTER_LIST_NAME=weekly\r\n")
    assert load_settings().list_name == "weekly"


def test_schedule_problems_come_with_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSLETTER_SMTP_PORT", "many")
    monkeypatch.setenv("NEWSLETTER_SCHEDULE", "Thu 25:00")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "NEWSLETTER_SCHEDULE: 25:00 is not a time of day" in str(info.value)
    assert "NEWSLETTER_SMTP_PORT: " in str(info.value)


@pytest.mark.parametrize("name", ["news.", "news..weekly", "a." + "b" * 63])
def test_a_list_name_that_would_make_an_invalid_list_id_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # RFC 2919: the list-label of List-Id is a dot-atom; "news." gives <news..example.org>.
    monkeypatch.setenv("NEWSLETTER_LIST_NAME", name)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "NEWSLETTER_LIST_NAME: is not a valid list name" in str(info.value)


@pytest.mark.parametrize("name", ["news.2026", "a_b-c.d", "a-", "9", "a" * 64])
def test_list_names_with_dots_between_labels_are_accepted(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("NEWSLETTER_LIST_NAME", name)
    assert load_settings().list_name == name


@pytest.mark.parametrize("value", [",", " , ,"])
def test_scheduled_lists_that_name_no_list_are_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # Otherwise every slot would be "sent" to no list at all, and exit 0.
    monkeypatch.setenv("NEWSLETTER_SCHEDULE_LISTS", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "NEWSLETTER_SCHEDULE_LISTS: " in str(info.value) and "names no list" in str(info.value)


@pytest.mark.parametrize("value", ["", " "])
def test_empty_scheduled_lists_mean_the_default_list(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("NEWSLETTER_SCHEDULE_LISTS", value)
    assert load_settings().scheduled_lists == ["research-news"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NEWSLETTER_SMTP_HELO_NAME", "mail.example.org"),
        ("NEWSLETTER_SMTP_HELO_NAME", "[192.0.2.1]"),
        ("NEWSLETTER_SMTP_HELO_NAME", "[IPv6:2001:db8::1]"),
        ("NEWSLETTER_SMTP_HOST", "::1"),
        ("NEWSLETTER_SMTP_HOST", "smtp.example.org"),
    ],
)
def test_ordinary_smtp_host_and_helo_names_are_accepted(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    load_settings()


# ------------------------------------------------------------ the database


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("postgresql://news:pa55word@db.example.org/news", "holds a password (user:password@)"),
        ("postgresql://news@db.example.org/news?password=pa55word", "holds a password (?pass"),
        ("postgres://news@db.example.org", "names no database"),
        ("postgresql+psycopg://db.example.org/news", "naming a driver; write postgresql://"),
        ("mysql://news:pa55word@db.example.org/news", "(mysql://) of a database newsletter"),
        ("sqlite://srv/news/newsletter.sqlite3", "sqlite:// URL without a file"),
        ("file:///srv/news/newsletter.sqlite3", "(file://) of a database newsletter cannot"),
        ("host=db.example.org dbname=news password=pa55word", "keyword=value string"),
        ("postgresql:/db.example.org/news", "one slash after the scheme"),
        ("  ", "is empty"),
    ],
)
def test_a_bad_database_setting_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str, expected: str
) -> None:
    monkeypatch.setenv("NEWSLETTER_DATABASE", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    (line,) = [x for x in str(info.value).splitlines() if "NEWSLETTER_DATABASE" in x]
    assert line.startswith("  NEWSLETTER_DATABASE: ") and expected in line, line
    assert "pa55word" not in line  # a URL may hold a password: it is not repeated
    assert list(tmp_path.iterdir()) == []  # no folder named after the scheme


def test_a_database_url_in_dotenv_names_its_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "NEWSLETTER_LIST_NAME=weekly\nNEWSLETTER_DATABASE=postgres://u:secret@db/news\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert ".env:2: NEWSLETTER_DATABASE: holds a password" in str(info.value)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("sqlite:///news/newsletter.sqlite3", "news/newsletter.sqlite3"),
        ("sqlite:////srv/news/newsletter.sqlite3", "/srv/news/newsletter.sqlite3"),
        ("sqlite:///with%20space.sqlite3", "with space.sqlite3"),
    ],
)
def test_sqlite_urls_name_a_file(monkeypatch: pytest.MonkeyPatch, value: str, path: str) -> None:
    monkeypatch.setenv("NEWSLETTER_DATABASE", value)
    assert load_settings().database.path == Path(path)


def test_a_postgresql_url_is_kept_and_its_password_comes_from_its_own_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "postgresql://news@db.example.org:5433/news?sslmode=verify-full"
    monkeypatch.setenv("NEWSLETTER_DATABASE", url)
    monkeypatch.setenv("NEWSLETTER_DATABASE_PASSWORD", "pa55word")
    settings = load_settings()
    assert settings.database.kind == "postgresql" and settings.database.url == url
    assert settings.database_location.password == "pa55word"  # noqa: S105
    # Shown, logged or printed: never the password.
    for shown in (str(settings.database_location), repr(settings.database_location),
                  repr(settings), str(settings.model_dump())):  # fmt: skip
        assert "pa55word" not in shown


@pytest.mark.parametrize(
    "value",
    [
        "newsletter.sqlite3",
        "/srv/news/newsletter.sqlite3",
        "C:\\news\\newsletter.sqlite3",  # Windows drives: a letter and a colon, not a scheme
        "C:/news/newsletter.sqlite3",
        "C://news/newsletter.sqlite3",
        "file:newsletter.sqlite3",  # no //: a file of that name
        "data/2026:q1/newsletter.sqlite3",
    ],
)
def test_database_paths_are_taken_as_paths(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NEWSLETTER_DATABASE", value)
    assert load_settings().database.path == Path(value)
