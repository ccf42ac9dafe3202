"""Notification templates, and rendering them with ``templateParameters``.

A template is what Omnichannel calls a notification template: a title, an icon,
fields made of a header and a value with ``{slug}`` placeholders, the text of
the two buttons, the display timeout and whether it auto-accepts.

Rendering fills each ``{slug}`` from ``templateParameters``. A slug the integrator
did not give renders as the empty string, and a field whose value renders empty
is left out, so CIF's example (empty parameters) still shows a clean card.
Values are untrusted text: clients must display them as text, never as HTML.
What a card renders to is bounded (``limits.maxNotificationBytes``, measured by
``rendered_size_over``): every session of the agent is sent it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from .frames import Field, TemplateInfo

__all__ = [
    "FieldTemplate", "Template", "BUILTIN_TEMPLATES", "Renderer", "render_text", "render_fields", "rendered_size_over",
    "parameters", "describe",
]

_SLUG = re.compile(r"\{([A-Za-z0-9_.\-]+)\}")


class FieldTemplate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    header: str
    value: str


class Template(msgspec.Struct, rename="camel", frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    title: str
    icon: str = "chat"
    fields: tuple[FieldTemplate, ...] = ()
    accept_text: str = "Accept"
    reject_text: str = "Reject"
    show_timeout: bool = True
    timeout: Annotated[float, Meta(gt=0, le=86400)] = 120.0
    auto_accept: bool = False


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return msgspec.json.encode(value).decode()


@functools.lru_cache(maxsize=1024)
def _split(text: str) -> tuple[str, ...]:
    """``"Hi {name}!"`` -> ``("Hi ", "name", "!")``: literals at even indexes, slugs at odd."""
    return tuple(_SLUG.split(text))


def render_text(text: str, params: Mapping[str, Any]) -> str:
    """Fill ``{slug}`` placeholders; unknown slugs become empty."""
    if "{" not in text:
        return text
    parts = _split(text)
    out = [
        part if i % 2 == 0 else _text(params.get(part))
        for i, part in enumerate(parts)
    ]
    return "".join(out)


def render_fields(template: Template, params: Mapping[str, Any]) -> tuple[Field, ...]:
    fields = []
    for f in template.fields:
        value = render_text(f.value, params).strip()
        if value:
            fields.append(Field(header=f.header, value=value))
    return tuple(fields)


def _compile(text: str) -> Callable[[Mapping[str, Any]], str]:
    """``render_text`` for one ``text``, with its shape worked out once."""
    parts = _split(text)
    if len(parts) == 1:
        return lambda params: text
    if len(parts) == 3 and not parts[0] and not parts[2]:
        slug = parts[1]  # the whole text is one slug: the usual field

        def one(params: Mapping[str, Any]) -> str:
            value = params.get(slug)
            return value if type(value) is str else _text(value)

        return one
    return functools.partial(render_text, text)


class Renderer:
    """A template's title and fields, split once and filled per notification.

    The same result as ``render_text(template.title, params)`` and
    ``render_fields(template, params)``, at a fraction of the cost.
    """

    __slots__ = ("template", "title", "fields")

    def __init__(self, template: Template) -> None:
        self.template = template
        self.title = _compile(template.title)
        self.fields = tuple((f.header, _compile(f.value)) for f in template.fields)

    def __call__(self, params: Mapping[str, Any]) -> tuple[str, tuple[Field, ...]]:
        fields = []
        for header, render in self.fields:
            value = render(params).strip()
            if value:
                fields.append(Field(header=header, value=value))
        return self.title(params), tuple(fields)


def rendered_size_over(title: str, fields: tuple[Field, ...], limit: int) -> int:
    """The bytes of ``title`` and ``fields`` as JSON if that is more than ``limit``, else 0.

    Every session of the agent is sent the card, so its size is bounded
    apart from the frame's (``server.maxSize``): a few short parameters can
    fill a long template many times over. JSON takes at most 6 bytes for a
    character (``\\u001f``), and a field at most 25 more (``{"header":"",
    "value":""},``), so only a card within 6 times the limit is encoded to
    know: the usual one costs a few ``len()``.
    """
    chars = len(title)
    for field in fields:
        chars += len(field.header) + len(field.value)
    if 6 * chars + 25 * len(fields) + 4 <= limit:
        return 0
    size = len(msgspec.json.encode(title)) + len(msgspec.json.encode(fields))
    return size if size > limit else 0


def parameters(template: Template) -> tuple[str, ...]:
    """The slugs ``template`` fills, from its title then its fields, each once, in order."""
    seen: dict[str, None] = {}
    for text in (template.title, *(f.value for f in template.fields)):
        for slug in _split(text)[1::2]:
            seen.setdefault(slug, None)
    return tuple(seen)


def describe(template: Template) -> TemplateInfo:
    """``template`` as the ``templates`` frame lists it."""
    return TemplateInfo(name=template.name, title=template.title, icon=template.icon, timeout=template.timeout,
                        auto_accept=template.auto_accept, parameters=parameters(template))


def _t(name: str, title: str, icon: str, fields: list[tuple[str, str]], **kw: Any) -> Template:
    return Template(
        name=name,
        title=title,
        icon=icon,
        fields=tuple(FieldTemplate(header=h, value=v) for h, v in fields),
        **kw,
    )


# The built-in templates, so CIF's example works with no config. Names follow
# Omnichannel's default templates.
BUILTIN_TEMPLATES: tuple[Template, ...] = (
    _t(
        "msdyn_chat_incoming_unauthenticated",
        "New chat request",
        "chat",
        [("Customer", "{customerName}"), ("Queue", "{queueName}"), ("Comment", "{comment}")],
    ),
    _t(
        "msdyn_chat_incoming_authenticated",
        "New chat request from {customerName}",
        "chat",
        [("Customer", "{customerName}"), ("Account", "{accountName}"), ("Queue", "{queueName}"),
         ("Comment", "{comment}")],
    ),
    _t(
        "msdyn_chat_transfer",
        "Chat transferred to you",
        "transfer",
        [("Customer", "{customerName}"), ("From", "{fromAgent}"), ("Comment", "{comment}")],
    ),
    _t(
        "msdyn_voicecall_incoming_unauthenticated",
        "Incoming call",
        "phone",
        [("Caller", "{callerId}"), ("Queue", "{queueName}")],
        accept_text="Answer",
        reject_text="Decline",
        timeout=30.0,
    ),
    _t(
        "msdyn_voicecall_incoming_authenticated",
        "Incoming call from {customerName}",
        "phone",
        [("Caller", "{callerId}"), ("Customer", "{customerName}"), ("Queue", "{queueName}")],
        accept_text="Answer",
        reject_text="Decline",
        timeout=30.0,
    ),
    _t(
        "msdyn_chat_incoming_autoaccept",
        "Chat assigned to you",
        "chat",
        [("Customer", "{customerName}"), ("Queue", "{queueName}")],
        show_timeout=False,
        auto_accept=True,
    ),
)
