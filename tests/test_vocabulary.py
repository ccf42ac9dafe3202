"""One vocabulary: Python, JavaScript and the docs take protocol names from one place.

``protocol/vocabulary.py`` defines every outcome, agent error code, integrator
error message, msdyn name and close code. The browser code cannot import
Python, so ``demo_client/vocabulary.js`` is generated from it (``make
vocabulary``) and the other scripts import from that. These tests fail when

(a) ``vocabulary.js`` is not exactly what the Python module generates;
(b) a script uses a vocabulary object without importing it from
    ``./vocabulary.js``, or a member the vocabulary does not define;
(c) a script other than ``vocabulary.js`` spells a vocabulary value itself
    (a string, an object key, a close-code number);
(d) the engine or the server spells one outside ``protocol/vocabulary.py``.

``tests/test_docs.py`` checks docs/protocol.md's tables against the same
definitions.

The scripts are read with the small tokenizer below rather than searched as
text, so that comments may name values while literals may not.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from deskpush.protocol import vocabulary as v

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "demo_client"
VOCABULARY_JS = CLIENT / "vocabulary.js"
IMPORT_FROM = "./vocabulary.js"
SCRIPTS = sorted(p for p in CLIENT.glob("*.js") if p != VOCABULARY_JS)
PYTHON_SOURCES = sorted(
    p for folder in ("protocol", "server", "demo_client") for p in (ROOT / folder).glob("*.py")
    if p.name != "vocabulary.py"
)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------
# A JavaScript tokenizer, enough for our own scripts: names, numbers, strings
# (template literal chunks included), regular expressions and punctuators;
# comments and white space are dropped.


class Token(NamedTuple):
    kind: str  # "name", "number", "string", "regex" or "punct"
    text: str  # a string's content without its quotes; anything else as written
    pos: int


_NAME = re.compile(r"[A-Za-z_$][\w$]*")
_NUMBER = re.compile(
    r"0[xX][\da-fA-F_]+n?|0[oO][0-7_]+n?|0[bB][01_]+n?"
    r"|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d[\d_]*)?n?"
)
_PUNCTS = sorted(
    """>>>= ... === !== **= <<= >>= >>> &&= ||= ??= => == != <= >= && || ?? ?. ++ -- += -= *= /= %= &= |= ^=
    ** << >> { } ( ) [ ] ; , < > + - * / % & | ^ ! ~ ? : = . @ #""".split(),
    key=len, reverse=True,
)
# After these names a `/` starts a regular expression, not a division.
_BEFORE_REGEX = {"return", "typeof", "instanceof", "in", "of", "new", "delete", "void", "throw", "case",
                 "do", "else", "yield", "await"}


def js_tokens(src: str) -> list[Token]:
    """The tokens of a script. Raises SyntaxError on an unterminated literal or comment."""
    out: list[Token] = []
    opened: list[bool] = []  # one per open `{` or `${`: True for a template's `${`
    i, n = 0, len(src)

    def template_chunk(start: int) -> int:
        """Add the chunk of a template literal from ``start``; returns where to go on."""
        j = start
        while j < n:
            if src[j] == "\\":
                j += 2
            elif src[j] == "`":
                out.append(Token("string", src[start:j], start))
                return j + 1
            elif src.startswith("${", j):
                out.append(Token("string", src[start:j], start))
                opened.append(True)
                return j + 2
            else:
                j += 1
        raise SyntaxError(f"unterminated template literal at offset {start}")

    while i < n:
        c = src[i]
        prev = out[-1] if out else None
        if c.isspace():
            i += 1
        elif src.startswith("//", i):
            end = src.find("\n", i)
            i = n if end < 0 else end
        elif src.startswith("/*", i):
            end = src.find("*/", i + 2)
            if end < 0:
                raise SyntaxError(f"unterminated comment at offset {i}")
            i = end + 2
        elif c in "'\"":
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            if j >= n or src[j] != c:
                raise SyntaxError(f"unterminated string at offset {i}")
            out.append(Token("string", src[i + 1:j], i))
            i = j + 1
        elif c == "`":
            i = template_chunk(i + 1)
        elif c == "}" and opened and opened[-1]:
            opened.pop()
            i = template_chunk(i + 1)
        elif c == "/" and (prev is None or (prev.kind == "punct" and prev.text not in ")]}")
                           or (prev.kind == "name" and prev.text in _BEFORE_REGEX)):
            j, in_class = i + 1, False
            while j < n and src[j] != "\n" and (in_class or src[j] != "/"):
                if src[j] == "\\":
                    j += 1
                elif src[j] == "[":
                    in_class = True
                elif src[j] == "]":
                    in_class = False
                j += 1
            if j >= n or src[j] != "/":
                raise SyntaxError(f"unterminated regular expression at offset {i}")
            j += 1
            while j < n and (src[j].isalnum() or src[j] == "_"):
                j += 1
            out.append(Token("regex", src[i:j], i))
            i = j
        elif (m := _NUMBER.match(src, i)) and (c.isdigit() or c == "."):
            out.append(Token("number", m.group(), i))
            i = m.end()
        elif m := _NAME.match(src, i):
            out.append(Token("name", m.group(), i))
            i = m.end()
        else:
            punct = next((p for p in _PUNCTS if src.startswith(p, i)), None)
            if punct is None:
                raise SyntaxError(f"unexpected character {c!r} at offset {i}")
            if punct == "{":
                opened.append(False)
            elif punct == "}" and opened:
                opened.pop()
            out.append(Token("punct", punct, i))
            i += len(punct)
    return out


def number_value(text: str) -> float:
    text = text.replace("_", "").removesuffix("n")
    return int(text, 0) if text[:2].lower() in ("0x", "0o", "0b") else float(text)


def line_of(src: str, pos: int) -> int:
    return src.count("\n", 0, pos) + 1


class Import(NamedTuple):
    module: str
    imported: str  # the exported name; "*" for a namespace, "default" for a default import
    local: str
    start: int  # token indices of the whole statement
    end: int


def js_imports(tokens: list[Token]) -> list[Import]:
    """The static imports: ``import {A, B as C} from "m"``, ``import * as ns from "m"``, ``import D from "m"``."""
    out: list[Import] = []
    for i, t in enumerate(tokens):
        if t.kind != "name" or t.text != "import" or (i and tokens[i - 1].text in (".", "?.")):
            continue
        if i + 1 < len(tokens) and tokens[i + 1].text in ("(", "."):
            continue  # import("m"), import.meta
        bindings: list[tuple[str, str]] = []
        j, in_braces = i + 1, False
        while tokens[j].kind != "string":  # the module specifier ends the statement
            tok = tokens[j]
            if tok.text in ("{", "}"):
                in_braces = tok.text == "{"
            elif tok.text == "*":  # * as ns
                bindings.append(("*", tokens[j + 2].text))
                j += 2
            elif tok.kind == "name" and tok.text != "from":
                local = tok.text
                if tokens[j + 1].text == "as":
                    local = tokens[j + 2].text
                    j += 2
                bindings.append((tok.text if in_braces else "default", local))
            j += 1
        module = tokens[j].text
        out.extend(Import(module, imported, local, i, j) for imported, local in bindings)
        if not bindings:
            out.append(Import(module, "", "", i, j))  # import "m": for its effects
    return out


# ---------------------------------------------------------------------------
# The vocabulary, as the browser sees it and as Python defines it


def js_vocabulary() -> dict[str, dict[str, str | int]]:
    """``export const GROUP = Object.freeze({MEMBER: value, ...});`` of vocabulary.js."""
    tokens = js_tokens(VOCABULARY_JS.read_text(encoding="utf-8"))
    groups: dict[str, dict[str, str | int]] = {}
    for i, t in enumerate(tokens):
        if t.text == "export" and tokens[i + 1].text == "const":
            members: dict[str, str | int] = {}
            j = [x.text for x in tokens[i:]].index("{") + i + 1
            while tokens[j].text != "}":
                key, colon, value = tokens[j:j + 3]
                assert key.kind == "name" and colon.text == ":", key
                members[key.text] = value.text if value.kind == "string" else int(value.text)
                j += 4 if tokens[j + 3].text == "," else 3
            groups[tokens[i + 2].text] = members
    return groups


def outcome_reasons() -> dict[str, str]:
    """The ``responseReason`` of each outcome, by name, when it is not also an ``actionName``.

    ``Accept``, ``Reject``, ``Timeout`` and ``Cancel`` are left out: they are
    also what ``respond.action`` and the button labels say, so no literal check
    can tell them apart. The pair strings and the other reasons are the
    outcome's own.
    """
    actions = {o.action_name for o in v.OUTCOMES.values()}
    return {name: o.response_reason for name, o in v.OUTCOMES.items() if o.response_reason not in actions}


def wire_strings() -> dict[str, str]:
    """Every string value of the vocabulary, with the JavaScript expression that names it."""
    out: dict[str, str] = {}
    for group, members in js_vocabulary().items():
        for member, value in members.items():
            if isinstance(value, str):
                out[value] = f"{group}.{member}"
    for name, reason in outcome_reasons().items():
        out.setdefault(reason, f"the responseReason of OUTCOME.{name}")
    return out


def python_wire_strings() -> dict[str, str]:
    """Every string the engine and the server send that the vocabulary defines, with its Python name."""
    out = {str(o): name for name, o in v.OUTCOMES.items()}
    out |= {reason: f"{name}.response_reason" for name, reason in outcome_reasons().items()}
    for enum_ in (v.AgentErrorCode, v.ErrorMessage, v.MsdynName):
        out |= {m.value: f"{enum_.__name__}.{m.name}" for m in enum_}
    out |= {c.reason: f"{name}.reason" for name, c in v.CLOSINGS.items()}
    return out


CLOSE_CODES = {int(c): c for c in v.CloseCode}


# ---------------------------------------------------------------------------
# (a) vocabulary.js is generated


def test_vocabulary_js_is_generated_from_python():
    expected = v.javascript_module()
    actual = VOCABULARY_JS.read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(
        actual.splitlines(keepends=True), expected.splitlines(keepends=True),
        "demo_client/vocabulary.js", "javascript_module()"))
    assert actual == expected, (
        "demo_client/vocabulary.js differs from protocol/vocabulary.py; do not edit it by hand, "
        f"run `make vocabulary` and commit the result:\n{diff}")


def test_vocabulary_js_holds_every_value():
    groups = js_vocabulary()
    values = {value for members in groups.values() for value in members.values()}
    python = {str(o) for o in v.OUTCOMES.values()} | set(CLOSE_CODES)
    python |= {m.value for enum_ in (v.AgentErrorCode, v.ErrorMessage, v.MsdynName) for m in enum_}
    assert values == python, "javascript_module() must export every value of protocol/vocabulary.py"


# ---------------------------------------------------------------------------
# (b) scripts import what they use, and use only what exists


def test_pages_load_their_scripts_as_modules():
    # Only a module script can `import` from ./vocabulary.js.
    for page in sorted(CLIENT.glob("*.html")):
        tags = re.findall(r"<script\b[^>]*>", page.read_text(encoding="utf-8"))
        assert tags, f"{page.name} loads no script"
        for tag in tags:
            assert re.search(r'\btype="module"', tag), f'{page.name}: {tag} must have type="module"'


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_the_vocabulary_it_uses(script: Path):
    groups = js_vocabulary()
    src = script.read_text(encoding="utf-8")
    tokens = js_tokens(src)
    imports = js_imports(tokens)
    in_import = {k for imp in imports for k in range(imp.start, imp.end + 1)}
    bound: dict[str, str] = {}  # local name -> vocabulary object
    problems: list[str] = []
    for imp in imports:
        if Path(imp.module).name != VOCABULARY_JS.name:
            continue
        where = f"{script.name}:{line_of(src, tokens[imp.start].pos)}"
        if imp.module != IMPORT_FROM:
            problems.append(f'{where}: import the vocabulary from "{IMPORT_FROM}", not "{imp.module}"')
        elif imp.imported in ("*", "default", ""):
            problems.append(f'{where}: import the vocabulary objects by name: import {{ OUTCOME }} from "{IMPORT_FROM}"')
        elif imp.imported not in groups:
            problems.append(f"{where}: vocabulary.js exports no {imp.imported} (it has {', '.join(groups)})")
        else:
            bound[imp.local] = imp.imported
    for k, t in enumerate(tokens):
        if t.kind != "name" or k in in_import or (k and tokens[k - 1].text in (".", "?.")):
            continue
        where = f"{script.name}:{line_of(src, t.pos)}"
        if t.text in groups and t.text not in bound:
            problems.append(f'{where}: {t.text} is used but not imported: add it to the import from "{IMPORT_FROM}"')
        group = bound.get(t.text)
        if group is None or k + 1 >= len(tokens):
            continue
        after = tokens[k + 1].text
        if after == "[":
            problems.append(f"{where}: write {t.text}.NAME, not {t.text}[...], so that the name can be checked")
        elif after in (".", "?."):
            member = tokens[k + 2].text
            if member not in groups[group]:
                problems.append(
                    f"{where}: {t.text}.{member} does not exist; {group} has {', '.join(groups[group])}. "
                    "Add a name to protocol/vocabulary.py and run `make vocabulary` if one is missing")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------
# (c) no script but vocabulary.js spells a value


def _is_close_code_position(tokens: list[Token], k: int) -> bool:
    """Where a number can only be a close code: close(N, ...), code: N, === N, case N."""
    two_before = [t.text for t in tokens[max(0, k - 2):k]]
    neighbours = {two_before[-1] if two_before else "", tokens[k + 1].text if k + 1 < len(tokens) else ""}
    return (two_before in (["close", "("], ["code", ":"]) or "case" in two_before[-1:]
            or not neighbours.isdisjoint({"===", "!==", "==", "!="}))


def spelled_values(src: str) -> list[tuple[int, str, str]]:
    """(line, literal, what it is) for every vocabulary value the script spells itself.

    Strings and template chunks equal to a value count, and so do names equal
    to one (an object key such as ``{UnknownNotification: ...}``). A number
    equal to a close code counts anywhere, except 1000 (also a second in
    milliseconds), which counts only where it can only be a close code.
    """
    strings = wire_strings()
    found = []
    tokens = js_tokens(src)
    for k, t in enumerate(tokens):
        if t.kind in ("string", "name") and t.text in strings:
            found.append((line_of(src, t.pos), repr(t.text) if t.kind == "string" else t.text, strings[t.text]))
        elif t.kind == "number" and (code := CLOSE_CODES.get(number_value(t.text))) is not None:
            if code != v.CloseCode.NORMAL_CLOSURE or _is_close_code_position(tokens, k):
                found.append((line_of(src, t.pos), t.text, f"CLOSE_CODE.{code.name}"))
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_spells_no_vocabulary_value(script: Path):
    found = spelled_values(script.read_text(encoding="utf-8"))
    assert not found, "\n".join(
        f'{script.name}:{line}: {literal} is {name}: write {name} (imported from "{IMPORT_FROM}") instead'
        for line, literal, name in found)


def test_spelled_values_finds_literals_not_comments():
    src = """
        // comments may say UnknownNotification, "Accept/Accept" and 4401
        const ERROR_TEXT = { [AGENT_ERROR.BAD_FRAME]: "a", UnknownNotification: "b" };
        if (ev.code === 4401) x = "Reject/DeclinedByAgent";
        sock.close(1000, "bye"); const ms = secs * 1000; const BASE_MS = 1000;
        const re = /NotifyEvent/; const t = `${a}/${b}`; const u = `${"CancelEvent"}`;
        const r = "AgentDisconnected";
    """
    assert [(line, literal) for line, literal, _ in spelled_values(src)] == [
        (3, "UnknownNotification"), (4, "4401"), (4, "'Reject/DeclinedByAgent'"),
        (5, "1000"), (6, "'CancelEvent'"), (7, "'AgentDisconnected'")]


# ---------------------------------------------------------------------------
# (d) the engine and the server spell no value either


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
        return [node.target]
    return []


def _strings_in_all(tree: ast.AST) -> set[int]:
    """ids of the constants in ``__all__ = [...]``: names of Python objects, not values sent."""
    return {id(c) for node in ast.walk(tree)
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in _targets(node))
            for c in ast.walk(node.value)}


def python_spellings(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, literal, vocabulary name) for each value a Python module spells itself.

    Strings equal to a value count anywhere but in ``__all__``, which names
    Python objects (the frame classes ``NotifyEvent`` and ``CancelEvent``); an
    integer equal to a close code counts where it is one: an argument of a
    ``close()`` or ``fail()`` call, or assigned to a name with CLOSE in it.
    """
    strings = python_wire_strings()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    exports = _strings_in_all(tree)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in strings
                and id(node) not in exports):
            yield node.lineno, repr(node.value), strings[node.value]
        ints: list[ast.expr] = []
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("close", "fail"):
                ints = [*node.args, *(kw.value for kw in node.keywords)]
        elif any("CLOSE" in ast.unparse(t).upper() for t in _targets(node)):
            ints = [node.value]
        for arg in ints:
            if isinstance(arg, ast.Constant) and type(arg.value) is int and arg.value in CLOSE_CODES:
                yield arg.lineno, repr(arg.value), f"CloseCode.{CLOSE_CODES[arg.value].name}"


def test_engine_and_server_spell_no_vocabulary_value():
    found = [f"{rel(path)}:{line}: {literal} is {name}"
             for path in PYTHON_SOURCES for line, literal, name in sorted(python_spellings(path))]
    assert not found, (
        "protocol/, server/ and demo_client/ must take these from deskpush.protocol.vocabulary (add a name there "
        "if one is missing, then run `make vocabulary`):\n" + "\n".join(found))
