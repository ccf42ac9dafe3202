"""Rules of the code itself: public APIs only, one import name.

* websockets is used only through what it documents: its sans-I/O protocol,
  its asyncio client, its data structures and exceptions. Nothing private
  (an underscore name, the parser generator's internals, the message queue)
  is read, patched or overridden, so a websockets release cannot break
  deskpush silently.
* No module reaches into another module's or object's private names.
* Installed, deskpush is one top-level import package, ``deskpush``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    p for folder in ("protocol", "server", "demo_client", "tests", "bench", "bench/peers", "reliability")
    for p in (ROOT / folder).glob("*.py")
)

# What websockets documents (its API reference: the sans-I/O layer, the
# asyncio implementation, data structures, exceptions, URIs), by module.
WEBSOCKETS_PUBLIC = {
    "websockets": {"ServerProtocol", "ClientProtocol", "Frame", "Opcode", "State", "Request", "Response",
                   "Headers", "ConnectionClosed", "ConnectionClosedOK", "ConnectionClosedError"},
    "websockets.asyncio.server": {"serve", "broadcast", "ServerConnection"},
    "websockets.asyncio.client": {"connect", "ClientConnection", "ClientProtocol"},
    "websockets.frames": {"Frame", "Opcode", "Close", "CloseCode"},
    "websockets.http11": {"Request", "Response"},
    "websockets.datastructures": {"Headers"},
    "websockets.protocol": {"State", "Side"},
    "websockets.exceptions": {"ConnectionClosed", "ConnectionClosedOK", "ConnectionClosedError", "InvalidHandshake",
                              "InvalidStatus", "InvalidURI", "InvalidMessage"},
    "websockets.uri": {"parse_uri"},
}
# Internals earlier code relied on; a grep, so comments cannot hide a use either.
WEBSOCKETS_INTERNALS = re.compile(
    r"\.(gi_yieldfrom|gi_code|gi_frame|recv_messages|current_size|expect_continuation_frame|parser_exc|eof_sent)\b"
    r"|\bprotocol\.(parser|reader|writes|events)\b|\breader\.buffer\b"
    r"|apply_mask|websockets\.(legacy|utils|speedups)"
)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_websockets_is_imported_only_by_its_documented_names():
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("websockets") and alias.name not in WEBSOCKETS_PUBLIC:
                        found.append(f"{rel(path)}:{node.lineno}: import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("websockets"):
                public = WEBSOCKETS_PUBLIC.get(node.module, set())
                for alias in node.names:
                    if alias.name not in public:
                        found.append(f"{rel(path)}:{node.lineno}: from {node.module} import {alias.name}")
    assert not found, "not in websockets' documented API (see WEBSOCKETS_PUBLIC):\n" + "\n".join(found)


def test_no_websockets_internals_are_read_or_overridden():
    found = [
        f"{rel(path)}:{n}: {line.strip()}"
        for path in SOURCES if path.name != "test_code.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if WEBSOCKETS_INTERNALS.search(line)
    ]
    assert not found, "websockets internals:\n" + "\n".join(found)


def test_no_class_extends_a_websockets_class():
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("websockets") for alias in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                if bases & imported or any(b.startswith("websockets.") for b in bases):
                    found.append(f"{rel(path)}:{node.lineno}: class {node.name}({', '.join(sorted(bases))})")
    assert not found, "overriding websockets' classes ties deskpush to their internals:\n" + "\n".join(found)


def test_no_module_reaches_into_private_names():
    """``x._name`` only on ``self`` or ``cls``; no ``from m import _name``.

    ``logging._srcfile`` is the switch the logging HOWTO documents (its
    "Optimization" section), and ``os._exit`` is documented as the way a
    child leaves after ``os.fork()`` (cluster mode's snapshot child): the two
    exceptions.
    """
    allowed = {"logging._srcfile", "os._exit"}
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if ast.unparse(node) not in allowed:
                    found.append(f"{rel(path)}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{rel(path)}:{node.lineno}: from {node.module} import {', '.join(private)}")
    assert not found, "private names used from outside:\n" + "\n".join(found)


def test_code_imports_deskpush_not_its_folders():
    """``protocol``, ``server`` and ``demo_client`` are folders; the package is ``deskpush``."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                if name.split(".")[0] in ("protocol", "server", "demo_client"):
                    found.append(f"{rel(path)}:{node.lineno}: {name}")
    assert not found, "import these as deskpush.protocol, deskpush.server, deskpush.client:\n" + "\n".join(found)


def test_the_wheel_installs_one_top_level_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("deskpush-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"deskpush"}
    for module in ("deskpush/protocol/engine.py", "deskpush/server/app.py", "deskpush/client/integrator.py",
                   "deskpush/client/cif.js", "deskpush/client/vocabulary.js", "deskpush/client/index.html"):
        assert module in names, module
