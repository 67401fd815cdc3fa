"""README's Python examples run as written (with their paths in a temporary directory)."""

from __future__ import annotations

import contextlib
import grp
import io
import json
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from unixsock_asgi import ArgumentError, Client

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(encoding="utf-8"), flags=re.M | re.S)


def run_block(source: str, short_dir: Path) -> tuple[dict[str, Any], str]:
    """Execute one block, its /run paths moved into ``short_dir``; return its namespace and output."""
    source = source.replace("/run/shop", str(short_dir / "shop")).replace("/run/me", str(short_dir / "me"))
    # The operations group of the example is this process's own group here.
    source = source.replace('getgrnam("ops")', f"getgrnam({grp.getgrgid(os.getgid()).gr_name!r})")
    (short_dir / "me").mkdir(exist_ok=True, mode=0o700)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, str(README), "exec"), namespace)
    return namespace, out.getvalue()


def import_shop(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The first block is ``shop.py``: importable as ``shop`` by the blocks after it."""
    shop = types.ModuleType("shop")
    shop.__dict__.update(run_block(python_blocks()[0], short_dir)[0])
    monkeypatch.setitem(sys.modules, "shop", shop)
    return shop


def test_readme_has_the_examples_these_tests_run() -> None:
    blocks = python_blocks()
    assert len(blocks) == 5, "a Python block was added to or removed from README: run it here too"
    assert "async def restock" in blocks[0] and "def default_settings" in blocks[1]
    assert "UnixSockServer" in blocks[4]


def test_every_python_block_of_readme_runs(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import_shop(short_dir, monkeypatch)
    for block in python_blocks()[1:]:
        run_block(block, short_dir)  # raises if a name is missing, an import is wrong...


def test_the_settings_fixture_puts_back_what_a_test_set(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = import_shop(short_dir, monkeypatch)
    namespace, _ = run_block(python_blocks()[1], short_dir)
    fixture = namespace["default_settings"].__wrapped__()  # the generator pytest would drive
    next(fixture)
    shop.settings.set("greeting", "changed by a test")
    assert next(fixture, "done") == "done"
    assert shop.settings["greeting"] == "hello"


def test_add_it_to_your_app_does_what_readme_says(short_dir: Path) -> None:
    namespace, _ = run_block(python_blocks()[0], short_dir)
    socket_path = str(short_dir / "shop" / f"shop-{os.getpid()}.sock")
    with TestClient(namespace["app"]) as http:
        control = Client(socket_path)
        reply = control.send("restock", {"item_id": 1, "quantity": 4})
        assert reply is not None and (reply.status, reply.payload) == ("success", {"stock": 7})
        assert http.get("/items/1").json() == {"name": "kettle", "stock": 7}
        reply = control.send("set", {"name": "greeting", "value": "hi"})
        assert reply is not None and reply.ok
        assert http.get("/").json() == {"message": "hi"}
        reply = control.send("restock", {"item_id": "one", "quantity": 4})
        assert reply is not None and reply.status == "failure" and "item_id" in reply.error
    assert not os.path.exists(socket_path)
    # "To test a command": the same check without a socket, and its message as README quotes it.
    recipe = re.search(r'To test a command: `commands\["(\w+)"\]\.bind\((\{.*?\})\)`', README.read_text())
    assert recipe is not None
    with pytest.raises(ArgumentError) as info:
        namespace["commands"][recipe.group(1)].bind(json.loads(recipe.group(2)))
    assert "argument 'item_id' of 'restock': expected an integer, got string 'one'" in str(info.value)
    with pytest.raises(KeyError, match=r"no command 'restok'; commands: .*restock"):
        namespace["commands"]["restok"]


def test_the_server_and_client_example_prints_what_readme_says(short_dir: Path) -> None:
    block = python_blocks()[4]
    _, out = run_block(block, short_dir)
    promised = re.search(r"print\(.*\)\s+# (.*)$", block, flags=re.M)
    assert promised is not None and out == promised.group(1) + "\n"


def test_every_link_to_a_section_of_readme_finds_its_heading() -> None:
    # As GitHub makes a heading's anchor: lower case, punctuation dropped, spaces to hyphens.
    anchors, fenced = set(), False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#+ (.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    links = set(re.findall(r"\]\(#([^)]+)\)", README.read_text()))
    assert links and not links - anchors, sorted(links - anchors)


def test_readme_lists_every_built_in_command_and_every_command_line_command() -> None:
    from unixsock_asgi._builtins import builtin_commands
    from unixsock_asgi.cli import build_parser

    text = README.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    for command in builtin_commands:
        assert any(re.search(rf"`{command.name}[ `]", row.split(" | ")[0]) for row in rows), command.name
    (subcommands,) = [a for a in build_parser()._actions if a.dest == "command"]
    assert subcommands.choices
    for name in subcommands.choices:
        assert any(row.startswith(f"| `{name} ") for row in rows), name
