"""The listener's own behaviour: binding, a failed accept, the rate of its log lines.

Running out of descriptors for real is in test_fds.py (a child process with a
low RLIMIT_NOFILE); here one listening socket is made to fail the way a
kernel short of memory makes it fail (ENOBUFS), which refusing cannot help.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from deskpush.server.listener import AcceptCounts, AcceptReport, Listener, bind

from .conftest import UNIT


class Echo(asyncio.Protocol):
    made: list[Echo] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        Echo.made.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class FailsOnce(socket.socket):
    """A listening socket whose first accept() fails as one short of kernel memory does."""

    failed = False

    def accept(self):  # type: ignore[override]
        if not self.failed:
            self.failed = True
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return super().accept()


async def test_an_accept_failure_refusing_cannot_help_pauses_a_second_then_accepts(caplog):
    caplog.set_level(logging.WARNING, "deskpush")
    sock = FailsOnce(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    counts = AcceptCounts()
    Echo.made = []
    listener = Listener([sock], Echo, backlog=16, counts=counts)
    listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"ping")
        # Waiting in the kernel's queue meanwhile, then served.
        async with asyncio.timeout(5 * UNIT):
            assert await reader.readexactly(4) == b"ping"
        assert counts.accept_pauses == 1 and counts.refused_out_of_fds == 0 and len(Echo.made) == 1
        [line] = [r.getMessage() for r in caplog.records]
        assert line == ("accept failed (No buffer space available): not accepting for 1 s; "
                        "waiting connections stay in the kernel's queue")
        writer.close()
    finally:
        listener.close()
        await listener.wait_closed()


async def test_close_stops_listening_and_leaves_the_accepted_connections_alone():
    Echo.made = []
    listener = Listener(await bind("127.0.0.1", 0, 16), Echo, backlog=16)
    listener.start()
    clients = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(5)]
    try:
        while len(Echo.made) < 5:
            await asyncio.sleep(0.01)
        listener.close()
        await listener.wait_closed()
        assert all(not p.transport.is_closing() for p in Echo.made)
        # Closed: nothing listens on the port any more.
        try:
            socket.create_connection(("127.0.0.1", listener.port), timeout=1).close()
            refused = False
        except ConnectionRefusedError:
            refused = True
        assert refused
    finally:
        for c in clients:
            c.close()
        for p in Echo.made:
            p.transport.close()


async def test_a_name_binds_each_of_its_addresses_on_one_port():
    sockets = await bind("localhost", 0, 16)
    try:
        ports = {s.getsockname()[1] for s in sockets}
        families = {s.family for s in sockets}
        assert len(ports) == 1 and socket.AF_INET in families
        if socket.AF_INET6 in families:
            v6 = next(s for s in sockets if s.family == socket.AF_INET6)
            assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for s in sockets:
            s.close()


async def test_refusals_are_logged_once_a_second_at_most_and_all_accounted_for(caplog):
    caplog.set_level(logging.WARNING, "deskpush")
    counts = AcceptCounts()
    report = AcceptReport(asyncio.get_running_loop(), counts)
    exc = OSError(errno.EMFILE, "Too many open files")
    start = asyncio.get_running_loop().time()
    for _ in range(1000):
        counts.refused_out_of_fds += 1
        report.refused(exc)
    # The first at once; the other 999 when the second is over.
    assert len(caplog.records) == 1
    await asyncio.sleep(1.5 * UNIT)
    elapsed = asyncio.get_running_loop().time() - start
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) <= 1 + elapsed, lines
    assert lines[0].startswith("refused 1 connection: no file descriptor left for them (Too many open files; ")
    assert lines[-1].startswith("refused 999 connections: ") and "1000 refused since start" in lines[-1]
    report.close()
    assert len(caplog.records) == len(lines)  # nothing was left to say
