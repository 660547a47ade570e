"""The layout's rules, read from the source with ``ast``: what may import what, where SQL is.

- a database driver is imported only in its backend's folder (``sqlite3`` under
  storage/sqlite/), by ``import`` or importlib; outside storage/ no module imports the
  SQLite backend, uses a connection (``.conn``, ``.execute``...) or holds a string that
  looks like SQL (``+`` chains joined, bytes, any case): every stage reaches the database
  through the storage interface (:func:`storage_problems`, fed source text in the tests);
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

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "newsletter"

# Upper-case keywords in the shape of a statement: English text ("select the lists
# from ...") is lower-case, and a user-facing sentence never says "PRAGMA".
SQL = re.compile(
    r"\bSELECT\b[\s\S]*\bFROM\b|\b(?:INSERT|REPLACE)\s+(?:OR\s+\w+\s+)?INTO\b"
    r"|\bUPDATE\s+\S+[\s\S]*\bSET\b|\bDELETE\s+FROM\b"
    r"|\bCREATE\s+(?:TEMP\s+|TEMPORARY\s+|UNIQUE\s+)?(?:TABLE|INDEX|VIEW|TRIGGER)\b"
    r"|\bDROP\s+(?:TABLE|INDEX|VIEW|TRIGGER)\b|\bALTER\s+TABLE\b"
    r"|\b(?:ATTACH|DETACH)\s+DATABASE\b|\bATTACH\s+'|\bPRAGMA\b|\bVACUUM\b"
    r"|\bBEGIN\s+(?:IMMEDIATE|EXCLUSIVE|DEFERRED|TRANSACTION)\b"
    r"|^\s*(?:BEGIN|COMMIT|ROLLBACK)\s*;?\s*$"
)
# In any case, the shape of a whole statement: after the verb come a table's name and
# the clause SQL puts there ("select email from subscribers where ..."), which prose
# ("select the lists from the page", "delete from your list") does not have.
_NAME = r"[\w.\"{}]+"
SQL_ANY_CASE = re.compile(
    rf"\bselect\s+(?:distinct\s+)?(?:\*|[\w.()*]+(?:\s*,\s*[\w.()*]+)*)\s+from\s+{_NAME}\s*"
    r"(?:$|;|\)|\bwhere\b|\bjoin\b|\border\s+by\b|\bgroup\s+by\b|\blimit\b|\bindexed\b)"
    rf"|\b(?:insert|replace)\s+(?:or\s+\w+\s+)?into\s+{_NAME}\s*(?:\(|\bvalues\b|\bselect\b)"
    rf"|\bupdate\s+{_NAME}\s+set\s+\w+\s*="
    rf"|\bdelete\s+from\s+{_NAME}\s*(?:$|;|\bwhere\b)"
    r"|\bcreate\s+(?:temp\w*\s+|unique\s+)?(?:table|index|view|trigger)\s+"
    rf"(?:if\s+not\s+exists\s+)?{_NAME}\s*(?:\(|\bon\b|\bas\b)"
    rf"|\bdrop\s+(?:table|index|view|trigger)\s+(?:if\s+exists\s+{_NAME}|{_NAME}\s*(?:;|$))"
    rf"|\balter\s+table\s+{_NAME}\s+(?:add|drop|rename)\b"
    r"|\battach\s+(?:database\s+)?(?:'[^']*'|\?|:\w+|\{\})\s+as\b|\bdetach\s+database\b"
    r"|\bpragma\s+\w+\s*(?:=|\(|;|$)|\bbegin\s+(?:immediate|exclusive|deferred)\b"
    r"|\bvacuum\s+into\b|^\s*(?:begin(?:\s+transaction)?|commit|rollback|vacuum)\s*;?\s*$",
    re.IGNORECASE,
)
# Database drivers, and the one backend folder each may be imported in.
DRIVERS = {
    "sqlite3": "storage/sqlite/",
    "apsw": "storage/sqlite/",
    "psycopg": "storage/postgres/",
    "psycopg2": "storage/postgres/",
}
# What a connection is used through: outside storage/ nobody holds one.
CONNECTION_ATTRIBUTES = frozenset({"conn", "execute", "executemany", "executescript"})


def looks_like_sql(text: str) -> bool:
    return bool(SQL.search(text) or SQL_ANY_CASE.search(text))


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text("utf-8"), str(path))


def sources() -> Iterator[tuple[str, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), path.read_text("utf-8")


def _package_of(path: str) -> list[str]:
    """The package a module at ``path`` (relative to src/newsletter) is in, as parts."""
    parts = ["newsletter", *path.removesuffix(".py").split("/")]
    return parts[:-1]


def imports(tree: ast.Module, path: str = "") -> Iterator[tuple[int, str]]:
    """Every module an import names, with its line: relative imports resolved against
    ``path``, and ``importlib.import_module``/``__import__`` calls with a constant name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = _package_of(path)[: len(_package_of(path)) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            if module:
                yield node.lineno, module
                for alias in node.names:  # `from newsletter import storage`
                    yield node.lineno, f"{module}.{alias.name}"
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def _dynamic_import(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in ("import_module", "__import__")


def _text(node: ast.expr) -> str | None:
    """The constant text of a string expression: literals (bytes too), f-strings with
    ``{}`` for what is filled in, and ``+`` chains of them; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
        value = node.value
        return value.decode("latin-1") if isinstance(value, bytes) else value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) or "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        if left is None and right is None:
            return None
        return (left or "{}") + (right or "{}")
    return None


def strings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Every string an expression spells out (implicit concatenation is one constant
    already; ``+`` chains are joined, outermost first)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.expr):
            text = _text(node)
            if text is not None:
                yield node.lineno, text


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def storage_problems(source: str, path: str) -> list[str]:
    """What breaks the storage rules in the module at ``path`` (relative to src/newsletter)
    whose text is ``source``: ``path:line: what``, one per line and rule.

    A driver is imported only in its backend's folder (importlib too); outside storage/
    nothing imports the SQLite backend, reaches for a connection (``.conn``,
    ``.execute``...) or spells out SQL (``+`` chains, bytes and any case included)."""
    tree = ast.parse(source, path)
    inside = path.startswith("storage/")
    found: dict[tuple[int, str], str] = {}

    def flag(line: int, rule: str, what: str) -> None:
        found.setdefault((line, rule), f"src/newsletter/{path}:{line}: {what}")

    for line, name in imports(tree, path):
        folder = DRIVERS.get(_top(name))
        if folder is not None and not path.startswith(folder):
            flag(line, "driver", f"imports {name} (for {folder} only)")
        if not inside and _names(name, ("storage.sqlite",)):
            flag(line, "backend", f"imports {name} (use newsletter.storage.open_storage)")
    for node in ast.walk(tree):
        if inside:
            break
        if isinstance(node, ast.Call) and _dynamic_import(node):
            first = node.args[0] if node.args else None
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                flag(node.lineno, "dynamic", "imports a module named at run time")
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node) or ""
            if dotted == "newsletter.storage.sqlite" or dotted.startswith(
                "newsletter.storage.sqlite."
            ):
                flag(node.lineno, "backend", f"uses {dotted} (use newsletter.storage)")
            if node.attr in CONNECTION_ATTRIBUTES:
                flag(node.lineno, "connection", f"uses .{node.attr} (add a store method)")
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", "") == "getattr"
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in CONNECTION_ATTRIBUTES
        ):
            flag(node.lineno, "connection", f"uses .{node.args[1].value} (add a store method)")
    if not inside:
        for line, text in strings(tree):
            if looks_like_sql(text):
                flag(line, "sql", f"SQL {text.strip()[:80]!r} (add a store method)")
    return [found[key] for key in sorted(found)]


def _top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


def test_the_package_is_where_the_rules_look() -> None:
    found = dict(modules())
    assert "storage/sqlite/connection.py" in found and "render/pipeline.py" in found
    # the checks below see what they look for where it is allowed
    assert any(n == "sqlite3" for _, n in imports(found["storage/sqlite/connection.py"]))
    assert any(SQL.search(t) for _, t in strings(found["storage/sqlite/send_log.py"]))
    assert any(SQL_ANY_CASE.search(t) for _, t in strings(found["storage/sqlite/send_log.py"]))


def test_the_storage_rules_hold_in_every_module() -> None:
    wrong = [w for path, source in sources() for w in storage_problems(source, path)]
    assert not wrong, (
        "drivers, connections and SQL belong in storage/ (every stage reaches the database "
        "through newsletter.storage):\n" + "\n".join(wrong)
    )


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
    assert not looks_like_sql("select a list; you may select one from each list")
    assert not looks_like_sql(
        "Delete from your list and create table plans; drop table talk for now"
    )
    assert not looks_like_sql("insert into the page, then update your settings = fine")
    assert not looks_like_sql("begin the import, then commit to a date")
    assert not looks_like_sql("attach the database to the email as a file")


# -- the storage rules see through each way round them -------------------------------

TRICKS = {
    "importlib": 'import importlib\ndriver = importlib.import_module("sqlite3")\n',
    "dunder import": 'driver = __import__("sqlite3")\n',
    "from importlib": 'from importlib import import_module\nimport_module("psycopg")\n',
    "a name built at run time": "import importlib\nimportlib.import_module(NAME)\n",
    "re-exported driver": "from newsletter.storage.sqlite.connection import sqlite3 as driver\n",
    "the backend": "from newsletter.storage.sqlite import SqliteStorage\n",
    "the backend, as a module": "from newsletter.storage import sqlite\n",
    "the backend, relative": "from ..storage.sqlite import SqliteStorage\n",
    "the backend, by attribute": "import newsletter.storage\nnewsletter.storage.sqlite.x\n",
    "psycopg outside its folder": "import psycopg\n",
    "lower case": 'Q = "select email from subscribers where id = ?"\n',
    "a + chain": 'Q = "SELECT email " + "FROM subscribers"\n',
    "a + chain, lower case, with a name": 'Q = "select email from " + table + " where id = 1"\n',
    "implicit concatenation": 'Q = ("delete from "\n     "subscribers where id = ?")\n',
    "an f-string": 'Q = f"update {table} set state = ?"\n',
    "bytes": 'Q = b"SELECT email FROM subscribers"\n',
    "drop table": 'Q = "DROP TABLE subscribers"\n',
    "drop table, lower case": 'Q = "drop table if exists subscribers"\n',
    "alter table": 'Q = "alter table sends add column x"\n',
    "attach": "Q = \"ATTACH DATABASE 'other.db' AS other\"\n",
    "attach, lower case": 'Q = "attach ? as other"\n',
    "detach": 'Q = "detach database other"\n',
    "replace into": 'Q = "REPLACE INTO locks (name) VALUES (?)"\n',
    "replace into, lower case": 'Q = "replace into locks values (?)"\n',
    "begin": 'Q = "BEGIN IMMEDIATE"\n',
    "commit": 'Q = "COMMIT"\n',
    "vacuum": 'Q = "vacuum"\n',
    "pragma, lower case": 'Q = "pragma user_version = 4"\n',
    "a connection": "storage.conn.execute(Q)\n",
    "execute on anything": "cursor.executemany(Q, rows)\n",
    "getattr": 'getattr(storage, "conn")\n',
}


@pytest.mark.parametrize("trick", TRICKS)
def test_each_way_round_the_storage_rules_is_caught(trick: str) -> None:
    wrong = storage_problems(TRICKS[trick], "web/throwaway.py")
    assert wrong and all(w.startswith("src/newsletter/web/throwaway.py:") for w in wrong), trick


def test_inside_storage_the_backend_may_do_all_of_it() -> None:
    allowed = "".join(TRICKS[t] for t in TRICKS if "psycopg" not in TRICKS[t])
    assert storage_problems(allowed, "storage/sqlite/throwaway.py") == []
    # a driver stays in its own backend's folder, even within storage/
    assert storage_problems("import psycopg\n", "storage/sqlite/throwaway.py")
    assert storage_problems("import sqlite3\n", "storage/base.py")
    assert not storage_problems("import psycopg\n", "storage/postgres/throwaway.py")


def test_prose_and_the_storage_interface_pass() -> None:
    source = '''"""Select the lists from the page; delete from your list when done."""
from newsletter.storage import open_storage
storage = open_storage(path)
storage.subscribers.opt_out("news", "ann@example.org")
message = "select a list, then update your settings"
help = "begin the import, then commit to a date"
'''
    assert storage_problems(source, "web/throwaway.py") == []
