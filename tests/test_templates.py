"""Rendering templates: the compiled Renderer agrees with the plain functions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from deskpush.protocol.frames import Field
from deskpush.protocol.templates import BUILTIN_TEMPLATES, FieldTemplate, Renderer, Template, render_fields, render_text

SLUGS = ["customerName", "queueName", "comment", "x"]
texts = st.lists(st.one_of(st.sampled_from([f"{{{s}}}" for s in SLUGS]), st.text(max_size=5)), max_size=4).map("".join)
values = st.one_of(st.text(max_size=8), st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                   st.lists(st.integers(), max_size=2))
params = st.dictionaries(st.sampled_from(SLUGS), values, max_size=4)


@given(title=texts, field_values=st.lists(texts, max_size=4), params=params)
def test_renderer_matches_render_text_and_render_fields(title, field_values, params):
    template = Template(name="t", title=title,
                        fields=tuple(FieldTemplate(header=f"H{i}", value=v) for i, v in enumerate(field_values)))
    assert Renderer(template)(params) == (render_text(title, params), render_fields(template, params))


def test_builtin_chat_template():
    chat = next(t for t in BUILTIN_TEMPLATES if t.name == "msdyn_chat_incoming_authenticated")
    title, fields = Renderer(chat)({"customerName": " Jane ", "comment": "  ", "queueName": 7})
    assert title == "New chat request from  Jane "
    assert fields == (Field(header="Customer", value="Jane"), Field(header="Queue", value="7"))
