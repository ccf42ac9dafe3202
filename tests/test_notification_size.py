"""``limits.maxNotificationBytes``: a notification's rendered title and fields are bounded.

Every session of the agent gets the card, so a 64 KiB card to an agent with
20 tabs is 1.3 MB written; the bound is on what is rendered, not on the frame
that asked for it (a short parameter in a long template, or one parameter in
several fields, renders bigger than it came).
"""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from deskpush.protocol import frames as f
from deskpush.protocol.engine import Limits
from deskpush.protocol.templates import FieldTemplate, Template, rendered_size_over

from .conftest import make_config, open_agent, open_integrator, recv_json, send_json
from .engine_helpers import CHAT, Harness, ended, sent_to, wire
from .test_server import notify

DEFAULT = Limits().max_notification_bytes


def rendered_size(frame: f.Notification) -> int:
    """What the limit counts: the card's title and fields, as JSON."""
    return len(msgspec.json.encode(frame.title)) + len(msgspec.json.encode(frame.fields))


def setup(limits: Limits = Limits(), **kw) -> Harness:
    h = Harness(limits, **kw)
    h.connect("s1", "a1")
    h.connect("s2", "a1")  # a second tab: gets the card too
    h.integrator("i1", "k1")
    return h


def test_the_default_is_16_kib():
    assert DEFAULT == 16 * 1024


def test_a_card_at_the_limit_is_shown_one_byte_over_is_refused():
    h = setup(Limits(max_notification_bytes=2000))
    # The built-in chat card: title "New chat request" and one field, Customer.
    overhead = len(b'"New chat request"') + len(b'[{"header":"Customer","value":""}]')
    at_limit = "x" * (2000 - overhead)
    out = h.notify("i1", "r1", "a1", params={"customerName": at_limit})
    (card,) = sent_to(out, "s1", f.Notification)
    assert rendered_size(card) == 2000 and sent_to(out, "s2", f.Notification)

    out = h.notify("i1", "r2", "a1", params={"customerName": at_limit + "x"})
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "error", "requestId": "r2",
         "error": {"message": "RejectAfterClientError", "msdyn_name": "NotifyEvent",
                   "details": "the rendered notification (title and fields) is 2001 bytes, over "
                              "limits.maxNotificationBytes (2000) - at $.input.templateParameters"}},
    ]
    assert sent_to(out, "s1") == [] and sent_to(out, "s2") == [] and ended(out) == []
    assert h.engine.statistics()["live"] == 1


def test_what_counts_is_the_rendered_card_not_the_frame():
    """One 4 KB parameter used in eight fields and the title renders to 36 KB: refused."""
    loud = Template(name="loud", title="{p}", fields=tuple(FieldTemplate(header=f"h{i}", value="{p}") for i in range(8)))
    h = setup(templates={"loud": loud, CHAT: Template(name=CHAT, title="t")})
    out = h.notify("i1", "r1", "a1", "loud", params={"p": "y" * 4000})
    (err,) = sent_to(out, "i1", f.IntegratorError)
    assert err.error.message == "RejectAfterClientError"
    assert err.error.details.startswith("the rendered notification (title and fields) is 36")
    # Parameters no field uses count for nothing.
    out = h.notify("i1", "r2", "a1", CHAT, params={"unused": "z" * 60_000})
    assert sent_to(out, "s1", f.Notification)


def test_json_escapes_and_utf8_count_as_sent():
    """Control characters take 6 bytes as JSON, a CJK character 3: the limit is on bytes sent."""
    h = setup(Limits(max_notification_bytes=1000))
    out = h.notify("i1", "r1", "a1", params={"customerName": "\x01" * 160})  # 160 characters, 960 bytes
    (err,) = sent_to(out, "i1", f.IntegratorError)
    assert "over limits.maxNotificationBytes (1000)" in err.error.details
    out = h.notify("i1", "r2", "a1", params={"customerName": "日" * 300})  # 900 bytes
    (card,) = sent_to(out, "s1", f.Notification)
    assert rendered_size(card) <= 1000


def test_a_refused_card_leaves_its_cancellation_token_free():
    h = setup(Limits(max_notification_bytes=100))
    out = h.notify("i1", "r1", "a1", params={"customerName": "x" * 200}, token="T")
    assert sent_to(out, "i1", f.IntegratorError)
    out = h.notify("i1", "r2", "a1", params={"customerName": "ok"}, token="T")
    assert sent_to(out, "s1", f.Notification)


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)


@given(title=texts, fields=st.lists(st.tuples(texts, texts), max_size=6), limit=st.integers(1, 2000))
def test_the_quick_bound_never_lets_a_card_over_the_limit_through(title, fields, limit):
    """``rendered_size_over`` skips the encoding when 6 bytes a character cannot reach the limit."""
    cards = tuple(f.Field(header=h, value=v) for h, v in fields)
    size = len(msgspec.json.encode(title)) + len(msgspec.json.encode(cards))
    assert rendered_size_over(title, cards, limit) == (size if size > limit else 0)


async def test_an_oversized_card_is_refused_over_a_real_socket():
    from deskpush.server import DeskpushServer

    from .conftest import API_KEY, SECRET

    config = make_config(max_notification_bytes=1024)
    async with DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        agent, _ = await open_agent(srv)
        ig = await open_integrator(srv)
        big = notify("big", progress=False)
        big["input"]["templateParameters"] = {"customerName": "x" * 600, "comment": "y" * 600}
        await send_json(ig, big)
        err = await recv_json(ig)
        assert err["requestId"] == "big" and err["error"]["message"] == "RejectAfterClientError"
        assert "limits.maxNotificationBytes (1024)" in err["error"]["details"]
        await send_json(ig, notify("small", progress=False))  # the connection stays; the agent saw nothing
        card = await recv_json(agent)
        assert card["type"] == "notification" and card["fields"] == []


def test_a_parameter_too_deep_to_render_is_refused_not_a_crash():
    """A value nested just short of what decodes can still be too deep to encode a few calls further in."""
    h = setup()
    value: list = []
    for _ in range(5000):  # built in Python: deeper than the decoder would ever let through
        value = [value]
    frame = f.NotifyEvent(request_id="r1", agent_id="a1",
                          input=f.NotifyInput(template_name=CHAT, template_parameters={"customerName": value}))
    out = h.integrator_frame("i1", frame)
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "error", "requestId": "r1",
         "error": {"message": "RejectAfterClientError", "msdyn_name": "NotifyEvent",
                   "details": "JSON nested too deeply - at $.input.templateParameters"}},
    ]
    assert sent_to(out, "s1") == [] and h.engine.statistics()["live"] == 0
