"""Keep the documentation true to the code.

The code is the authority: these tests fail when a frame, field, outcome, error,
config key or template is added or renamed without docs/protocol.md,
docs/configuration.md and deskpush.example.toml following, and when an example
frame in docs/protocol.md no longer decodes the way the server decodes it.
Outcomes, error codes and messages and close codes are those of
protocol/vocabulary.py, compared both ways with the tables of protocol.md.
"""

from __future__ import annotations

import itertools
import json
import re
import typing
from pathlib import Path

import msgspec
import pytest

from deskpush.protocol import BUILTIN_TEMPLATES, FieldTemplate, Limits, Template
from deskpush.protocol import frames as f
from deskpush.protocol import vocabulary as v
from deskpush.server import config

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_MD = ROOT / "docs" / "protocol.md"
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
EXAMPLE_TOML = ROOT / "deskpush.example.toml"

# Every frame, by endpoint and direction. A new frame must be placed here (and documented).
AGENT_IN = typing.get_args(f.AgentInbound)
INTEGRATOR_IN = typing.get_args(f.IntegratorInbound)
AGENT_OUT = (f.Welcome, f.Notification, f.Resolved, f.QueueLength, f.Pong, f.AgentError)
INTEGRATOR_OUT = (f.Status, f.Result, f.Resumed, f.IntegratorError, f.Templates)
DECODERS = {"agent": f.AGENT_DECODER, "integrator": f.INTEGRATOR_DECODER}
OUTBOUND = {
    "agent": {s.__struct_config__.tag: s for s in AGENT_OUT},
    "integrator": {s.__struct_config__.tag: s for s in INTEGRATOR_OUT},
}

WORKED_EXAMPLES = [
    "The CIF example, accepted",
    "Rejected",
    "Display timeout",
    "Queue full, and queue timeout",
    "Cancel before the agent answered",
    "Cancel after the agent accepted",
    "Malformed frames",
    "Reconnect and replay",
    "A cut and a resume (v1.1)",
]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def names(cls: type[msgspec.Struct]) -> list[str]:
    return [fi.encode_name for fi in msgspec.structs.fields(cls)]


def frame_structs() -> list[type[msgspec.Struct]]:
    return [
        obj for obj in vars(f).values()
        if isinstance(obj, type) and issubclass(obj, msgspec.Struct) and obj.__module__ == f.__name__
        and not obj.__name__.startswith("_")  # _Frame: the base, no frame of its own
    ]


def tag_of(cls: type[msgspec.Struct]) -> str | None:
    return cls.__struct_config__.tag


# ---------------------------------------------------------------------------
# Markdown helpers


def sections(text: str) -> list[tuple[tuple[str, ...], str]]:
    """(heading path, body) for every heading; the path holds the titles of levels 1 to n."""
    out: list[tuple[tuple[str, ...], str]] = []
    path: list[str] = []
    body: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        m = None if in_fence else re.match(r"^(#{1,6}) (.*)$", line)
        if m:
            out.append((tuple(path), "\n".join(body)))
            level = len(m.group(1))
            path = path[: level - 1] + [""] * max(0, level - 1 - len(path)) + [m.group(2).strip()]
            body = []
        else:
            body.append(line)
    out.append((tuple(path), "\n".join(body)))
    return out


def fenced_blocks(text: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """(heading path, lines) for every fenced code block, lines with indentation removed."""
    blocks = []
    for path, body in sections(text):
        lines: list[str] | None = None
        for line in body.splitlines():
            stripped = line.strip()
            if stripped.startswith("```"):
                if lines is None:
                    lines = []
                else:
                    blocks.append((path, lines))
                    lines = None
            elif lines is not None:
                lines.append(stripped)
    return blocks


def slug(title: str) -> str:
    """GitHub's heading anchor."""
    s = title.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for path, _ in sections(text):
        if not path:
            continue
        base = slug(path[-1])
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def table_rows(text: str, key: str) -> list[str]:
    """Table rows whose first cell is `key` (or `parent.key`, `parent[].key`)."""
    pattern = re.compile(r"^\|\s*`(?:[\w\[\].]*\.)?" + re.escape(key) + r"`\s*\|")
    return [line for line in text.splitlines() if pattern.match(line)]


def _cells(line: str) -> list[str]:
    """The cells of a table row: split on unescaped pipes (GitHub's rule, code spans too)."""
    cells = re.split(r"(?<!\\)\|", line.strip().removeprefix("|").removesuffix("|"))
    return [c.strip() for c in cells]


def markdown_table(text: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first table under ``heading`` (its title, without #), keyed by the header cells."""
    bodies = [body for path, body in sections(text) if path and path[-1] == heading]
    assert len(bodies) == 1, f"expected one section titled {heading!r} in {PROTOCOL_MD.name}, found {len(bodies)}"
    lines = bodies[0].splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    assert start is not None, f"no table under {heading!r}"
    header = _cells(lines[start])
    assert set(lines[start + 1].replace("|", "").strip()) <= set("-: "), f"{heading}: no separator row"
    rows = []
    for line in itertools.takewhile(lambda x: x.startswith("|"), lines[start + 2:]):
        cells = _cells(line)
        assert len(cells) == len(header), f"{heading}: {len(cells)} cells, not {len(header)}: {line}"
        rows.append(dict(zip(header, cells)))
    return rows


def code_span(cell: str) -> str | None:
    """``x`` for a cell that is one code span `x`, else None."""
    m = re.fullmatch(r"`([^`]+)`", cell)
    return m.group(1) if m else None


# ---------------------------------------------------------------------------
# (a) the example config


def test_example_config_loads():
    cfg = config.load(EXAMPLE_TOML)
    names_ = {t.name for t in cfg.templates}
    assert names_, "the example shows at least one template"
    assert set(cfg.template_map()) >= {t.name for t in BUILTIN_TEMPLATES}


def test_example_config_names_every_key():
    text = read(EXAMPLE_TOML)
    for cls in (config.Config, config.ServerSection, config.AuthSection, Limits,
                config.ApiKey, Template, FieldTemplate, config.ClusterSection):
        for name in names(cls):
            assert re.search(rf"\b{re.escape(name)}\b", text), f"{cls.__name__}.{name} missing from {EXAMPLE_TOML.name}"


def test_example_config_shows_the_defaults():
    # The example's [server] and [limits] spell out the defaults; change both together.
    cfg = config.load(EXAMPLE_TOML)
    assert cfg.server == config.ServerSection()
    assert cfg.limits == Limits()
    assert cfg.auth.jwt_secret_env == config.AuthSection().jwt_secret_env
    assert cfg.builtin_templates == config.Config().builtin_templates


# ---------------------------------------------------------------------------
# docs/configuration.md


def _default_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return None


@pytest.mark.parametrize("cls", [config.Config, config.ServerSection, config.AuthSection, Limits,
                                 config.ApiKey, Template, FieldTemplate, config.ClusterSection])
def test_configuration_md_documents_every_key_and_default(cls):
    text = read(CONFIGURATION_MD)
    for fi in msgspec.structs.fields(cls):
        rows = table_rows(text, fi.encode_name)
        if cls is FieldTemplate:
            assert f"`{fi.encode_name}`" in text, fi.encode_name
            continue
        assert rows, f"no table row for {cls.__name__}.{fi.encode_name} in configuration.md"
        shown = _default_text(fi.default)
        if shown is not None:
            assert any(f"`{shown}`" in row for row in rows), (
                f"{cls.__name__}.{fi.encode_name}: default {shown} not in its row", rows)


def test_configuration_md_lists_the_builtin_templates():
    text = read(CONFIGURATION_MD)
    slug_re = re.compile(r"\{([A-Za-z0-9_.\-]+)\}")
    for t in BUILTIN_TEMPLATES:
        rows = [line for line in text.splitlines() if line.startswith(f"| `{t.name}` |")]
        assert len(rows) == 2, f"{t.name}: expected a row in each built-in table"
        table, placeholders = rows
        assert t.title.replace("{", "`{").replace("}", "}`") in table
        assert f"`{t.icon}`" in table and f"{t.accept_text} / {t.reject_text}" in table
        assert f"{t.timeout:g} s" in table
        for field in t.fields:
            assert f"{field.header}: `{field.value}`" in table, (t.name, field)
        for name in set(slug_re.findall(t.title + "".join(x.value for x in t.fields))):
            assert f"`{name}`" in placeholders, (t.name, name)
        if t.auto_accept:
            assert "`autoAccept = true`" in table
        if not t.show_timeout:
            assert "`showTimeout = false`" in table


def test_configuration_md_toml_examples_load(tmp_path, monkeypatch):
    monkeypatch.setenv("DESKPUSH_CRM_KEY", "crm-key-from-env-" + "e" * 32)
    text = read(CONFIGURATION_MD)
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"block{i}.toml"
        path.write_text(block)
        config.load(path)


def test_configuration_md_env_vars():
    text = read(CONFIGURATION_MD)
    for var in (config.JWT_SECRET_ENV, config.API_KEY_ENV, "DESKPUSH_CONFIG", "DESKPUSH_URL"):
        assert f"`{var}`" in text, var


def test_configuration_md_cli_options(capsys):
    from deskpush.server.cli import main

    text = read(CONFIGURATION_MD)
    with pytest.raises(SystemExit):
        main(["--help"])
    commands = re.search(r"\{([a-z,-]+)\}", capsys.readouterr().out).group(1).split(",")
    assert commands == ["serve", "token", "notify", "reload", "local-cluster"]
    for command in commands:
        assert f"### deskpush {command}" in text, command
        with pytest.raises(SystemExit):
            main([command, "--help"])
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out)) - {"--help"}
        assert options, command
        for opt in options:
            assert f"`{opt}" in text, (command, opt)


# ---------------------------------------------------------------------------
# (b) every frame and field of protocol/frames.py


def test_every_struct_is_placed():
    tagged = {cls for cls in frame_structs() if tag_of(cls)}
    assert tagged == set(AGENT_IN + INTEGRATOR_IN + AGENT_OUT + INTEGRATOR_OUT), (
        "a frame was added or removed: place it in AGENT_OUT/INTEGRATOR_OUT and document it")


def test_every_frame_type_and_field_is_in_protocol_md():
    text = read(PROTOCOL_MD)
    for cls in frame_structs():
        tag = tag_of(cls)
        if tag:
            assert f'"{tag}"' in text, f"frame type {tag!r} missing"
        for name in names(cls):
            assert re.search(r"`(?:[\w\[\].]*\.)?" + re.escape(name) + r"`", text), (
                f"{cls.__name__}: field {name!r} missing")


@pytest.mark.parametrize("endpoint, direction, structs", [
    ("Agent endpoint", "Client frames", AGENT_IN),
    ("Agent endpoint", "Server frames", AGENT_OUT),
    ("Integrator endpoint", "Client frames", INTEGRATOR_IN),
    ("Integrator endpoint", "Server frames", INTEGRATOR_OUT),
])
def test_each_frame_has_a_section_with_a_field_table(endpoint, direction, structs):
    text = read(PROTOCOL_MD)
    found = {path[-1]: body for path, body in sections(text)
             if len(path) == 4 and path[1].startswith(endpoint) and path[2] == direction}
    for cls in structs:
        tag = tag_of(cls)
        assert tag in found, f"no '#### {tag}' under {endpoint} / {direction}"
        body = found[tag]
        assert table_rows(body, "type"), f"{tag}: no `type` row"
        assert f'"type":"{tag}"' in body, f"{tag}: no JSON example"
        for name in names(cls):
            assert table_rows(body, name), f"{endpoint} {tag}: no table row for {name!r}"


# ---------------------------------------------------------------------------
# (c) outcomes, error codes and messages, close codes: protocol/vocabulary.py


def _both_ways(documented: list[str], defined: set[str], what: str, table: str, once: bool = True) -> None:
    """Every name ``defined`` has a row in ``table`` and every row a defined name (``once``: one row each)."""
    problems = []
    if missing := sorted(defined - set(documented)):
        problems.append(f"{what} of protocol/vocabulary.py without a row in {table}: {missing}; add the rows")
    if unknown := sorted(set(documented) - defined):
        problems.append(f"rows of {table} that are no {what} of protocol/vocabulary.py: {unknown}; remove them, "
                        "or define the names in the vocabulary (then run `make vocabulary`)")
    assert not problems, "\n".join(problems)
    twice = sorted({x for x in documented if documented.count(x) > 1})
    assert not (once and twice), f"{what} with more than one row in {table}: {twice}"


def test_outcomes_table_is_the_vocabulary():
    rows = markdown_table(read(PROTOCOL_MD), "Outcomes")
    documented = [f"{code_span(r['`actionName`'])}/{code_span(r['`responseReason`'])}" for r in rows]
    _both_ways(documented, {str(o) for o in v.OUTCOMES.values()}, "outcomes", "the Outcomes table")


def test_agent_error_codes_table_is_the_vocabulary():
    rows = markdown_table(read(PROTOCOL_MD), "Agent error codes")
    documented = [str(code_span(r["`code`"])) for r in rows]
    _both_ways(documented, {c.value for c in v.AgentErrorCode}, "agent error codes", "the Agent error codes table")


def test_error_messages_table_is_the_vocabulary():
    rows = markdown_table(read(PROTOCOL_MD), "Error messages")
    table = "the Error messages table"
    # A message may have several rows, one per cause.
    messages = [str(code_span(r["`message`"])) for r in rows]
    _both_ways(messages, {m.value for m in v.ErrorMessage}, "error messages", table, once=False)
    # Each row names the calls it fails: "NotifyEvent", "NotifyEvent or CancelEvent".
    named: list[str] = []
    for message, row in zip(messages, rows):
        names = [n.strip().strip("`") for n in re.split(r",|\bor\b", row["`msdyn_name`"]) if n.strip()]
        # UNAUTHORIZED is no error frame (it is the body of an HTTP 401): it has no msdyn_name.
        assert names or message == v.ErrorMessage.UNAUTHORIZED, f"{table}: the row of {message} names no msdyn_name"
        named.extend(names)
    _both_ways(named, {m.value for m in v.MsdynName}, "msdyn names", f"the msdyn_name column of {table}", once=False)


def test_close_codes_table_is_the_vocabulary():
    rows = markdown_table(read(PROTOCOL_MD), "Close codes")
    by_code: dict[int, dict[str, str]] = {}
    for row in rows:
        assert row["Code"].isdigit(), f"Close codes table: {row['Code']!r} is not a code"
        by_code[int(row["Code"])] = row
    _both_ways([r["Code"] for r in rows], {str(int(c)) for c in v.CloseCode}, "close codes", "the Close codes table")
    for name, closing in v.CLOSINGS.items():
        row = " | ".join(by_code[closing.code].values())
        assert f"`{closing.reason}`" in row, (
            f"{name}: the row of {int(closing.code)} must give its reason as `{closing.reason}`")


# ---------------------------------------------------------------------------
# (d) the example frames decode


def _check_keys(obj: dict, cls: type[msgspec.Struct], where: str) -> None:
    allowed = set(names(cls))
    if tag_of(cls):
        allowed.add(cls.__struct_config__.tag_field)
    extra = set(obj) - allowed
    assert not extra, f"{where}: {cls.__name__} has no field(s) {sorted(extra)}"


def _check_server_frame(obj: object, endpoint: str, where: str) -> None:
    assert isinstance(obj, dict) and isinstance(obj.get("type"), str), f"{where}: not a frame"
    cls = OUTBOUND[endpoint].get(obj["type"])
    assert cls is not None, f"{where}: {obj['type']!r} is not a server frame of the {endpoint} endpoint"
    _check_keys(obj, cls, where)
    if cls is f.Result:
        value = obj["value"]
        vcls = f.CancelValue if "cancellationToken" in value else f.NotifyValue
        _check_keys(value, vcls, where)
        msgspec.convert(value, type=vcls)
        assert isinstance(obj["requestId"], str)
        return
    if cls is f.IntegratorError:
        _check_keys(obj["error"], f.ErrorBody, where)
    if cls is f.Notification:
        for field in obj["fields"]:
            _check_keys(field, f.Field, where)
    msgspec.convert(obj, type=cls)


def example_lines() -> list[tuple[str, str, str, str]]:
    """(where, endpoint, marker, payload) for every > / >! / < line of protocol.md's code blocks."""
    out = []
    for path, lines in fenced_blocks(read(PROTOCOL_MD)):
        h2 = path[1] if len(path) > 1 else ""
        endpoint = ("agent" if h2.startswith("Agent endpoint")
                    else "integrator" if h2.startswith("Integrator endpoint") else None)
        for line in lines:
            if m := re.match(r"^#\s*(agent|integrator)\b", line, re.I):
                endpoint = m.group(1).lower()
                continue
            if m := re.match(r"^(>!|>|<) (.*)$", line):
                marker, payload = m.groups()
                where = f"{' / '.join(p for p in path if p)}: {line[:80]}"
                out.append((where, endpoint, marker, payload))
            else:
                assert not line.startswith((">", "<")), f"unrecognised example line: {line!r}"
    return out


def test_example_frames_decode():
    lines = example_lines()
    checked = 0
    for where, endpoint, marker, payload in lines:
        if payload.startswith("(") and marker != ">!":
            continue  # "(close 4401 ...)", "(a 70 kB notifyEvent)": a note, not a frame
        assert endpoint in DECODERS, f"{where}: which endpoint? add a '# agent' or '# integrator' line"
        if marker == ">":
            DECODERS[endpoint].decode(payload.encode())
        elif marker == ">!":
            with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
                DECODERS[endpoint].decode(payload.encode())
        else:
            _check_server_frame(json.loads(payload), endpoint, where)
        checked += 1
    assert checked > 80, checked


def test_every_frame_has_an_example():
    seen = {"agent": {">": set(), "<": set()}, "integrator": {">": set(), "<": set()}}
    for _, endpoint, marker, payload in example_lines():
        if marker in (">", "<") and payload.startswith("{"):
            seen[endpoint][marker].add(json.loads(payload)["type"])
    assert seen["agent"][">"] >= {tag_of(c) for c in AGENT_IN}
    assert seen["agent"]["<"] >= {tag_of(c) for c in AGENT_OUT}
    assert seen["integrator"][">"] >= {tag_of(c) for c in INTEGRATOR_IN}
    assert seen["integrator"]["<"] >= {tag_of(c) for c in INTEGRATOR_OUT}


def test_worked_examples_are_there():
    text = read(PROTOCOL_MD)
    titles = {path[-1] for path, _ in sections(text) if len(path) == 3 and path[1] == "Worked examples"}
    for title in WORKED_EXAMPLES:
        assert title in titles, title


# ---------------------------------------------------------------------------
# Links between the documents


@pytest.mark.parametrize("doc", [PROTOCOL_MD, CONFIGURATION_MD])
def test_links_resolve(doc):
    text = read(doc)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{doc.name}: broken link {target}"
        if anchor:
            assert anchor in anchors(read(dest)), f"{doc.name}: no anchor for {target}"
