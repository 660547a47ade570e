"""A person's rights through the CLI, on both backends: every import records how its
members agreed (`--consent`), `subscribers show` and `export-person` give everything
stored about an address (the export checked field by field), and `erase` removes it
all but an anonymous send log and a keyed hash, which refuses the address at every
later import (the second import, the export re-imported, another list)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import EXAMPLE, run_cli
from smtp_server import Server
from test_bounces_cli import env_for, ok, returned

ANN = "ann@example.org"


def import_list(project: Path, env: dict[str, str], name: str, rows: str, *more: str,
                status: int = 0) -> str:  # fmt: skip
    (project / f"{name}.csv").write_text("email,first_name,town\n" + rows, encoding="utf-8")
    done = run_cli("subscribers", "import", f"{name}.csv", "--list", name, *more, cwd=project,
                   env=env)  # fmt: skip
    assert done.returncode == status, done.stdout + done.stderr
    return str(done.stdout)


def test_export_person_holds_everything_and_erase_leaves_only_what_it_says(
    project: Path, database: str
) -> None:
    server = Server().start()
    try:
        env = env_for(server, database)
        said = import_list(project, env, "research-news",
                           f"{ANN},Ann,Leeds\nbob@example.org,Bob,York\n",
                           "--consent", "Ticked the box on the 2026 membership form")  # fmt: skip
        assert "2 consent record(s) kept, from research-news.csv." in said
        import_list(project, env, "events", f"{ANN},Ann,Leeds\n")  # no --consent given
        ok(run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env))
        sender = next(r.mail_from for r in server.handler.received if r.rcpt_tos == [ANN])
        dsn = returned("postfix-unknown-user.eml", sender, ANN).decode("ascii")
        ok(run_cli("bounces", "process", cwd=project, env=env, input=dsn))
    finally:
        server.stop()

    shown = ok(run_cli("subscribers", "show", ANN, cwd=project, env=env))
    assert "consent to research-news: imported " in shown
    assert "(research-news.csv): 'Ticked the box on the 2026 membership form'" in shown
    assert "consent to events: imported" in shown and "not given (imported without" in shown

    export = run_cli("subscribers", "export-person", ANN, cwd=project, env=env)
    assert export.returncode == 0, export.stderr
    data = json.loads(export.stdout)
    assert data["format"] == "newsletter person export 1"
    assert data["email"] == ANN
    subscriber = dict(data["subscriber"])
    created = subscriber.pop("created_at")
    assert subscriber == {
        "first_name": "Ann",
        "last_name": "",
        "columns": {"town": "Leeds"},
    }
    assert [(j["list"], j["state"], j["opted_out_at"]) for j in data["lists"]] == [
        ("events", "member", None), ("research-news", "member", None)]  # fmt: skip
    (research,) = [j for j in data["lists"] if j["list"] == "research-news"]
    assert created == research["added_at"] <= data["lists"][0]["added_at"]
    assert data["suppression"]["reason"] == "bounced"
    assert [h["action"] for h in data["suppression_history"]] == ["suppress"]
    (first, second) = data["consents"]
    assert (first["list"], first["method"], first["source"]) == (
        "research-news", "import", "research-news.csv")  # fmt: skip
    assert first["consent_text"] == "Ticked the box on the 2026 membership form"
    assert first["confirmed_at"] and first["by"]
    assert (second["list"], second["consent_text"]) == (
        "events", "not given (imported without --consent)")  # fmt: skip
    (sent,) = data["sends"]
    assert (sent["issue"], sent["list"], sent["state"]) == ("2020-12-23", "research-news", "sent")
    (bounce,) = data["feedback"]
    assert (bounce["kind"], bounce["action"], bounce["status"]) == ("hard", "suppress", "5.1.1")
    assert ANN in bounce["message"]  # the message kept is theirs too
    assert data["signups"] == [] and data["mail"] == [] and data["erased_at"] is None

    # To a file: the same document.
    ok(run_cli("subscribers", "export-person", ANN, "-o", "ann.json", cwd=project, env=env))
    again = json.loads((project / "ann.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in again.items() if k != "exported_at"} == {
        k: v for k, v in data.items() if k != "exported_at"}  # fmt: skip

    # Last week's export of the list, kept by someone: it will not bring her back.
    ok(run_cli("subscribers", "export", "--list", "research-news", "backup.csv", cwd=project,
               env=env))  # fmt: skip
    erased = ok(run_cli("subscribers", "erase", ANN, "--yes", cwd=project, env=env))
    assert f"{ANN}: erased. Removed: " in erased
    assert "2 list_members" in erased and "1 subscribers" in erased and "2 consents" in erased
    assert "Made anonymous (kept for the counts): 1 deliveries, 1 feedback." in erased
    after = json.loads(ok(run_cli("subscribers", "export-person", ANN, cwd=project, env=env)))
    assert after["erased_at"] is not None
    for field in ("subscriber", "suppression"):
        assert after[field] is None
    for field in ("lists", "suppression_history", "consents", "signups", "mail", "sends",
                  "feedback"):  # fmt: skip
        assert after[field] == [], field
    shown_after = ok(run_cli("subscribers", "show", ANN, cwd=project, env=env))
    assert "erased at the person's request" in shown_after
    # Bob is untouched; the send still counts two.
    bob = json.loads(ok(run_cli("subscribers", "export-person", "bob@example.org", cwd=project,
                                env=env)))  # fmt: skip
    assert [(j["list"], j["state"]) for j in bob["lists"]] == [("research-news", "member")]
    (report,) = json.loads(ok(run_cli("bounces", "report", "2020-12-23", "--json",
                                      cwd=project, env=env)))  # fmt: skip
    assert report["counts"]["hard"] == 1  # the erased bounce still counts, anonymous
    assert ANN not in json.dumps(report)

    # The week after: the same file again, another list, the address in other case.
    again_said = import_list(project, env, "research-news",
                             f"{ANN},Ann,Leeds\nbob@example.org,Bob,York\n", status=3)  # fmt: skip
    assert "1 row(s) refused (line(s) 2)" in again_said
    other = import_list(project, env, "newcomers", "Ann@EXAMPLE.org,Ann,Leeds\n", status=3)
    assert "1 row(s) refused (line(s) 2)" in other
    restored = run_cli("subscribers", "import", "backup.csv", "--list", "research-news",
                       cwd=project, env=env)  # fmt: skip
    assert restored.returncode == 3 and "1 row(s) refused" in restored.stdout
    listed = ok(run_cli("subscribers", "list", "--list", "research-news", cwd=project, env=env))
    assert ANN not in listed and "bob@example.org" in listed
    assert ok(run_cli("subscribers", "erase", ANN, "--yes", cwd=project, env=env)).startswith(
        f"{ANN} was erased on "
    )


def test_erase_needs_the_secret_key_and_an_import_then_refuses_to_guess(
    project: Path, database: str
) -> None:
    env = env_for(None, database)
    import_list(project, env, "news", f"{ANN},Ann,Leeds\n")
    keyless = {k: v for k, v in env.items() if k != "NEWSLETTER_SECRET_KEY"}
    refused = run_cli("subscribers", "erase", ANN, "--yes", cwd=project, env=keyless)
    assert refused.returncode != 0 and "NEWSLETTER_SECRET_KEY is not set" in refused.stderr
    ok(run_cli("subscribers", "erase", ANN, "--yes", cwd=project, env=env))
    blind = run_cli("subscribers", "import", "news.csv", "--list", "news", cwd=project,
                    env=keyless)  # fmt: skip
    assert blind.returncode == 1
    assert "1 address(es) were erased" in blind.stderr and "nothing was imported" in blind.stderr
    rekeyed = {**env, "NEWSLETTER_SECRET_KEY": "another-secret-key-for-the-suite-9876"}
    other_key = run_cli("subscribers", "import", "news.csv", "--list", "news", cwd=project,
                        env=rekeyed)  # fmt: skip
    assert other_key.returncode == 1 and "with this NEWSLETTER_SECRET_KEY" in other_key.stderr
    # Nor may another key erase: its hash could not be checked by an import with the first.
    rekeyed_erase = run_cli("subscribers", "erase", "bob@example.org", "--yes", cwd=project,
                            env=rekeyed)  # fmt: skip
    assert rekeyed_erase.returncode == 1
    assert "earlier erasures were made with another NEWSLETTER_SECRET_KEY" in rekeyed_erase.stderr
    # Someone who asks before their address is on any list: the hash is kept all the same.
    said = ok(run_cli("subscribers", "erase", "early@example.org", "--yes", cwd=project,
                      env=env))  # fmt: skip
    assert "early@example.org: erased. Removed: nothing." in said
    (project / "early.csv").write_text("email\nearly@example.org\n", encoding="utf-8")
    early = run_cli("subscribers", "import", "early.csv", "--list", "news", cwd=project, env=env)
    assert early.returncode == 3 and "1 row(s) refused" in early.stdout
    unknown = run_cli("subscribers", "export-person", "nobody@example.org", cwd=project, env=env)
    assert (
        unknown.returncode == 1 and "nothing is stored about nobody@example.org" in unknown.stderr
    )


def test_consent_must_be_a_line_of_text(project: Path) -> None:
    env = env_for(None, str(project / "db.sqlite3"))
    (project / "m.csv").write_text(f"email\n{ANN}\n", encoding="utf-8")
    bad = run_cli("subscribers", "import", "m.csv", "--list", "news", "--consent", "  ",
                  cwd=project, env=env)  # fmt: skip
    assert bad.returncode == 1 and "--consent must say" in bad.stderr
    assert not (project / "db.sqlite3").exists() or "news" not in ok(
        run_cli("subscribers", "count", cwd=project, env=env))  # fmt: skip
    for hidden in ("Ticked \u202eoN\u202c the box", "Ticked\u200b the box", "Ticked\x1b[31m"):
        refused = run_cli("subscribers", "import", "m.csv", "--list", "news", "--consent",
                          hidden, cwd=project, env=env)  # fmt: skip
        assert refused.returncode == 1 and "--consent contains U+" in refused.stderr, hidden
    # Right-to-left text keeps its marks; joiners stay.
    said = ok(run_cli("subscribers", "import", "m.csv", "--list", "news", "--consent",
                      "\u05d8\u05d5\u05e4\u05e1 \u200f2026 \U0001f469\u200d\U0001f52c",
                      cwd=project, env=env))  # fmt: skip
    assert "1 consent record(s) kept" in said


def test_an_address_too_long_before_the_at_is_refused_at_import(project: Path) -> None:
    env = env_for(None, str(project / "db.sqlite3"))
    long_one = "a" * 65 + "@example.org"
    (project / "news.csv").write_text(f"email\n{long_one}\n{ANN}\n", encoding="utf-8")
    refused = run_cli("subscribers", "import", "news.csv", "--list", "news", cwd=project,
                      env=env)  # fmt: skip
    assert refused.returncode == 1 and "news.csv:2" in refused.stderr
    assert "too long before the @-sign (1 character too many)" in refused.stderr
    nothing = run_cli("subscribers", "list", "--list", "news", cwd=project, env=env)
    assert "there is no list named 'news'" in nothing.stderr  # nothing half-imported


def test_a_member_removed_and_imported_again_joins_on_the_new_files_word(
    project: Path, database: str
) -> None:
    env = env_for(None, database)
    import_list(project, env, "news", f"{ANN},Ann,Leeds\n", "--consent", "2025 paper form")
    # Imported again while a member: the record from when they joined stands.
    import_list(project, env, "news", f"{ANN},Ann,York\n", "--consent", "2026 web export")
    first = json.loads(ok(run_cli("subscribers", "export-person", ANN, cwd=project, env=env)))
    assert [c["consent_text"] for c in first["consents"]] == ["2025 paper form"]
    ok(run_cli("subscribers", "remove", "--list", "news", ANN, cwd=project, env=env))
    import_list(project, env, "news", f"{ANN},Ann,York\n", "--consent", "2026 event sign-in")
    data = json.loads(ok(run_cli("subscribers", "export-person", ANN, cwd=project, env=env)))
    assert [c["consent_text"] for c in data["consents"]] == [
        "2025 paper form", "2026 event sign-in"]  # fmt: skip
    assert [(j["list"], j["state"]) for j in data["lists"]] == [("news", "member")]


def test_a_kept_message_matched_to_nobody_that_names_them_is_shown_exported_and_erased(
    project: Path, database: str
) -> None:
    env = env_for(None, database)
    import_list(project, env, "news", f"{ANN},Ann,Leeds\n")
    letter = (
        "From: Someone <friend@example.net>\r\nTo: bounces@example.org\r\n"
        "Subject: my mother\r\nMessage-ID: <m1@example.net>\r\n\r\n"
        f"Please stop sending the newsletter to {ANN}, she has moved away.\r\n"
    )
    ok(run_cli("bounces", "process", cwd=project, env=env, input=letter))
    shown = ok(run_cli("subscribers", "show", ANN, cwd=project, env=env))
    assert "a message naming this address, matched to nobody [evidence #" in shown
    data = json.loads(ok(run_cli("subscribers", "export-person", ANN, cwd=project, env=env)))
    (named,) = data["feedback"]
    assert named["matched"] is False and "she has moved away" in named["message"]
    said = ok(run_cli("subscribers", "erase", ANN, "--yes", cwd=project, env=env))
    assert "1 feedback" in said
    kept = ok(run_cli("bounces", "show", str(named["evidence"]), cwd=project, env=env))
    assert ANN not in kept and "moved away" not in kept
