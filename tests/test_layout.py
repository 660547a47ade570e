"""The layout's rules, read from the source with ``ast``: what may import what, where SQL is.

- ``sqlite3`` is imported only under storage/sqlite/, and no string outside storage/
  looks like SQL: every stage reaches the database through the storage interface;
- render/ imports nothing from delivery/, storage/, schedule/ or web/;
- delivery/ imports nothing from web/, schedule/ or the CLI (web may import delivery);
- storage/ imports nothing from delivery/, web/, schedule/, render/, the build or the CLI;
- web/ and schedule/ import nothing from the CLI, and no stage reads the settings
  (only cli.py and wiring.py, which turns them into each stage's typed inputs);
- click is imported only by cli.py, aiosmtplib only by delivery/transports/smtp.py.

Each failure names the file and line.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "newsletter"

# Upper-case keywords in the shape of a statement: English text ("select the lists
# from ...") is lower-case, and a user-facing sentence never says "PRAGMA".
SQL = re.compile(
    r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+(?:OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\S+[\s\S]*\bSET\b"
    r"|\bDELETE\s+FROM\b|\bCREATE\s+(?:TEMP\s+|TEMPORARY\s+)?TABLE\b|\bPRAGMA\b"
)


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text("utf-8"), str(path))


def imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Every module an import names (relative imports are not used here), with its line."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
            for alias in node.names:  # `from newsletter import storage`
                yield node.lineno, f"{node.module}.{alias.name}"


def strings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(
                v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "{}"
                for v in node.values
            )
            yield node.lineno, text


def _top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


def test_the_package_is_where_the_rules_look() -> None:
    found = dict(modules())
    assert "storage/sqlite/connection.py" in found and "render/pipeline.py" in found
    # the checks below see what they look for where it is allowed
    assert any(n == "sqlite3" for _, n in imports(found["storage/sqlite/connection.py"]))
    assert any(SQL.search(t) for _, t in strings(found["storage/sqlite/send_log.py"]))


def test_only_the_sqlite_backend_imports_sqlite3() -> None:
    wrong = [
        f"src/newsletter/{path}:{line}: imports {name}"
        for path, tree in modules()
        if not path.startswith("storage/sqlite/")
        for line, name in imports(tree)
        if _top(name) == "sqlite3"
    ]
    assert not wrong, "sqlite3 is for storage/sqlite/ only:\n" + "\n".join(wrong)


def test_no_sql_outside_storage() -> None:
    wrong = [
        f"src/newsletter/{path}:{line}: {text.strip()[:80]!r}"
        for path, tree in modules()
        if not path.startswith("storage/")
        for line, text in strings(tree)
        if SQL.search(text)
    ]
    assert not wrong, "SQL belongs in storage/ (add a store method):\n" + "\n".join(wrong)


def test_render_imports_no_later_stage() -> None:
    later = ("delivery", "storage", "schedule", "web")
    found: dict[str, str] = {}  # file:line -> the first name it imports (one line each)
    for path, tree in modules():
        if path.startswith("render/"):
            for line, name in imports(tree):
                if any(
                    name == f"newsletter.{s}" or name.startswith(f"newsletter.{s}.") for s in later
                ):
                    found.setdefault(f"src/newsletter/{path}:{line}", name)
    wrong = [f"{where}: imports {name}" for where, name in found.items()]
    assert not wrong, "render/ comes before delivery, storage, schedule and web:\n" + "\n".join(
        wrong
    )


def _names(name: str, targets: tuple[str, ...]) -> bool:
    """Whether the imported ``name`` is one of the ``targets`` or inside one of them."""
    return any(name == f"newsletter.{t}" or name.startswith(f"newsletter.{t}.") for t in targets)


def _wrong_imports(folder: str, targets: tuple[str, ...]) -> list[str]:
    """``file:line: imports name`` for each module under ``folder`` naming a target."""
    found: dict[str, str] = {}  # file:line -> the first name it imports (one line each)
    for path, tree in modules():
        if path.startswith(folder):
            for line, name in imports(tree):
                if _names(name, targets):
                    found.setdefault(f"src/newsletter/{path}:{line}", name)
    return [f"{where}: imports {name}" for where, name in found.items()]


def test_delivery_imports_neither_web_nor_schedule_nor_the_cli() -> None:
    wrong = _wrong_imports("delivery/", ("web", "schedule", "cli"))
    assert not wrong, "delivery/ comes before web, schedule and the CLI:\n" + "\n".join(wrong)


def test_storage_imports_no_stage() -> None:
    wrong = _wrong_imports("storage/", ("delivery", "web", "schedule", "render", "build", "cli"))
    assert not wrong, "storage/ is below every stage:\n" + "\n".join(wrong)


def test_web_and_schedule_import_nothing_from_the_cli() -> None:
    wrong = _wrong_imports("web/", ("cli", "wiring")) + _wrong_imports(
        "schedule/", ("cli", "wiring")
    )
    assert not wrong, "web/ and schedule/ are called by the CLI, not the other way:\n" + (
        "\n".join(wrong)
    )


def test_only_the_cli_and_its_wiring_read_the_settings() -> None:
    wrong = [
        w
        for folder in ("render/", "audience/", "delivery/", "schedule/", "web/", "storage/")
        for w in _wrong_imports(folder, ("settings", "wiring", "cli"))
    ]
    assert not wrong, "stages take typed inputs, not the settings:\n" + "\n".join(wrong)


def test_only_the_cli_imports_click() -> None:
    wrong = [
        f"src/newsletter/{path}:{line}: imports {name}"
        for path, tree in modules()
        if path != "cli.py"
        for line, name in imports(tree)
        if _top(name) == "click"
    ]
    assert not wrong, "click is for cli.py only:\n" + "\n".join(wrong)


def test_the_import_rules_see_what_they_look_for() -> None:
    found = dict(modules())
    assert any(n == "click" for _, n in imports(found["cli.py"]))
    assert any(_names(n, ("storage",)) for _, n in imports(found["delivery/send_issue.py"]))
    assert any(_names(n, ("delivery",)) for _, n in imports(found["schedule/runner.py"]))
    assert any(_names(n, ("settings",)) for _, n in imports(found["wiring.py"]))
    assert not _names("newsletter.webhooks", ("web",))  # a name that only starts alike


def test_only_the_smtp_transport_imports_aiosmtplib() -> None:
    wrong = [
        f"src/newsletter/{path}:{line}: imports {name}"
        for path, tree in modules()
        if path != "delivery/transports/smtp.py"
        for line, name in imports(tree)
        if _top(name) == "aiosmtplib"
    ]
    assert not wrong, "aiosmtplib is for delivery/transports/smtp.py only:\n" + "\n".join(wrong)


def test_the_sql_pattern_tells_sql_from_prose() -> None:
    assert SQL.search("SELECT count(*) FROM deliveries WHERE send_id = ?")
    assert SQL.search("UPDATE deliveries INDEXED BY deliveries_by_state SET retry_at = 0")
    assert SQL.search("INSERT OR IGNORE INTO archive (issue_id) VALUES (?)")
    assert SQL.search("PRAGMA user_version")
    assert not SQL.search("select the lists from the page; update your settings")
    assert not SQL.search("Delete from your list and create table plans")
