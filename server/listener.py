"""The listening sockets, and what happens when the process runs out of file descriptors.

Every connection costs a file descriptor, and a busy server meets the
process's soft ``RLIMIT_NOFILE`` (often 1,024) long before anything else:
``raise_open_files_limit`` lifts it to the hard limit at start.

Past the limit, ``accept()`` fails with EMFILE (ENFILE: the whole system is
out). What ``loop.create_server`` does then, read in the loops' code and seen
with a soft limit of 40:

* asyncio (``selector_events._accept_connection``) calls the loop's exception
  handler for each failed attempt, which logs ``socket.accept() out of system
  resource`` with a traceback, stops reading the socket and tries again a
  second later. It stays in its loop of up to ``backlog`` attempts, so one
  wake-up can log thousands of tracebacks (a backlog of 4,096). The clients
  wait in the kernel's queue and get no answer; nothing is counted.
* uvloop (libuv's ``uv__server_io`` and ``uv__emfile_trick``) keeps a spare
  descriptor: it closes it, accepts every waiting connection and closes each
  at once, then takes the spare back. The clients see the connection closed,
  and nothing is logged or counted. If libuv cannot get its spare back, its
  code then hands the error to uvloop, which reports a fatal error and
  closes the listening socket for good.

So deskpush accepts on its own, the same way on both loops, with their
public API (``loop.add_reader``, ``socket.accept()``,
``loop.connect_accepted_socket()``; POSIX loops only: Windows' proactor has
no ``add_reader``, and ``deskpush serve``'s signal handling is POSIX's too).
It costs a task per accepted connection while it is handed over, as on
asyncio's own path, and the socket object the transport keeps.

A connection that cannot have a descriptor is refused at once with libuv's
spare-descriptor trick: answered ``503 Service Unavailable`` when the socket
takes it, then closed. Each is counted (``AcceptCounts``); one WARNING line
per second at most says how many; the connections already open are not
touched. Other accept failures (ENOBUFS, ENOMEM) pause accepting for a
second, as asyncio does, with a line too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AcceptCounts", "AcceptReport", "Listener", "bind", "open_files_limit", "raise_open_files_limit"]

log = logging.getLogger("deskpush")

try:
    import resource
except ImportError:  # pragma: no cover - Windows has no RLIMIT_NOFILE
    resource = None  # type: ignore[assignment]

# What a refused client reads, if it reads anything: the connection is closed right after.
_BUSY_BODY = b"server busy, try again later\n"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"\r\n" % len(_BUSY_BODY)
) + _BUSY_BODY
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
_PAUSE = 1.0  # seconds without accepting after a failure that refusing cannot help (as asyncio)
_REPORT_EVERY = 1.0  # seconds: at most one log line per this


def open_files_limit() -> int:
    """The soft ``RLIMIT_NOFILE``: how many descriptors the process may hold (-1: no such limit here)."""
    if resource is None:
        return -1
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return -1 if soft == resource.RLIM_INFINITY else soft


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return (before, after).

    Any process may raise its soft limit up to its hard limit; the soft one
    is often 1,024 for compatibility with ``select()``, which deskpush does
    not use. An unlimited hard limit is not a value the soft one can take
    (Linux caps it at ``fs.nr_open``, macOS at ``kern.maxfilesperproc``): the
    largest of a few usual values that is accepted is taken then.
    """
    if resource is None:
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    targets = [hard] if hard != resource.RLIM_INFINITY else [n for n in (1 << 20, 1 << 16, 10240) if n > soft]
    for target in targets:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        return soft, target
    return soft, soft


@dataclass(slots=True)
class AcceptCounts:
    """What accepting went through since start (read by ``DeskpushServer.statistics``)."""

    #: Connections refused because no file descriptor was left for them (answered 503 and closed).
    refused_out_of_fds: int = 0
    #: Times accepting paused for a second (a failure refusing could not help: ENOBUFS, ENOMEM, no spare).
    accept_pauses: int = 0


async def bind(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for ``host`` (every address it resolves to; ``""``: all interfaces) and ``port``.

    As ``loop.create_server`` binds: ``SO_REUSEADDR``, IPv6 sockets IPv6 only;
    with port 0, every address gets the port the first one was given.

    Raises:
        OSError: an address cannot be resolved or bound.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            if port == 0 and sockets:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """Accepts on ``sockets`` and hands each connection to ``factory`` (an ``asyncio.Protocol``'s).

    ``start()`` begins accepting, ``close()`` stops and closes the sockets,
    ``wait_closed()`` waits for the connections accepted before that to be
    handed over.
    """

    def __init__(self, sockets: list[socket.socket], factory: Callable[[], asyncio.Protocol], *,
                 backlog: int, counts: AcceptCounts | None = None) -> None:
        self.sockets = sockets
        self.port: int = sockets[0].getsockname()[1]
        self.counts = counts if counts is not None else AcceptCounts()
        self._loop = asyncio.get_running_loop()
        self._factory = factory
        self._batch = backlog  # accepts per wake-up at most, as asyncio's create_server
        self._spare: int | None = None
        self._connecting: set[asyncio.Task[None]] = set()
        self._resume: dict[socket.socket, asyncio.TimerHandle] = {}
        self._closed = False
        self._report = AcceptReport(self._loop, self.counts)

    def start(self) -> None:
        self._spare = _open_spare()
        for sock in self.sockets:
            self._loop.add_reader(sock, self._accept, sock)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock)
            sock.close()
        for handle in self._resume.values():
            handle.cancel()
        self._resume.clear()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        self._report.close()

    async def wait_closed(self) -> None:
        """Wait until every connection accepted before ``close()`` was handed to its protocol."""
        while self._connecting:
            await asyncio.wait(set(self._connecting))

    # ------------------------------------------------------------------

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._batch):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while waiting in the queue
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    refused = self._refuse_one(sock, exc)
                    if refused:
                        continue
                    if refused is None:
                        return  # nothing was waiting after all
                if not self._closed and sock not in self._resume:
                    self._pause(sock, exc)
                return
            self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        task = self._loop.create_task(self._connect(conn))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except BaseException as exc:
            # Before the transport took it (the client left, the loop is
            # closing): the socket is ours to close. After, the transport has
            # closed it, and closing again does nothing.
            conn.close()
            if not isinstance(exc, Exception):
                raise
            log.debug("connection dropped before it was handed over: %r", exc)

    def _refuse_one(self, sock: socket.socket, failure: OSError) -> bool | None:
        """Free the spare descriptor, accept one waiting connection with it, refuse it, take the spare back.

        Returns True if a connection was refused (or had gone), None if none
        was waiting, False if that did not work (no spare, or the freed
        descriptor went elsewhere): the caller then pauses accepting.
        """
        if self._spare is None:
            self._spare = _open_spare()
            if self._spare is None:
                return False
        os.close(self._spare)
        self._spare = None
        try:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionAbortedError:
                return True
            except OSError:
                return False
            _refuse(conn)
            self.counts.refused_out_of_fds += 1
            self._report.refused(failure)
            return True
        finally:
            self._spare = _open_spare()

    def _pause(self, sock: socket.socket, failure: OSError) -> None:
        """Stop accepting on ``sock`` for a second: the socket stays readable, and retrying at once would spin."""
        self._loop.remove_reader(sock)
        self._resume[sock] = self._loop.call_later(_PAUSE, self._resume_accepting, sock)
        self.counts.accept_pauses += 1
        self._report.paused(failure)

    def _resume_accepting(self, sock: socket.socket) -> None:
        del self._resume[sock]
        if not self._closed:
            self._loop.add_reader(sock, self._accept, sock)


def _open_spare() -> int | None:
    """A descriptor held only to be given up when accept() finds none free (None: none to be had)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def _refuse(conn: socket.socket) -> None:
    """Answer 503 if the socket takes it at once, and close.

    What the client already sent is read first: closing a socket with unread
    data makes the kernel send a reset, which can make the client drop the
    answer before reading it.
    """
    try:
        conn.setblocking(False)
        conn.recv(65536)
    except OSError:
        pass
    try:
        conn.send(_BUSY)
    except OSError:
        pass
    conn.close()


class AcceptReport:
    """One WARNING line per second at most for refusals and pauses, so a flood of them costs no flood of logs.

    The first one is logged at once; what comes within the next second is
    added up and logged when that second is over.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, counts: AcceptCounts) -> None:
        self._loop = loop
        self._counts = counts
        self._last = -math.inf
        self._handle: asyncio.TimerHandle | None = None
        self._refused = 0
        self._refused_reason = ""
        self._paused_reason = ""

    def refused(self, failure: OSError) -> None:
        self._refused += 1
        self._refused_reason = failure.strerror or str(failure)
        self._due()

    def paused(self, failure: OSError) -> None:
        self._paused_reason = failure.strerror or str(failure)
        self._due()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._write()

    def _due(self) -> None:
        if self._handle is not None:
            return
        now = self._loop.time()
        if now - self._last >= _REPORT_EVERY:
            self._write()
        else:
            self._handle = self._loop.call_at(self._last + _REPORT_EVERY, self._flush)

    def _flush(self) -> None:
        self._handle = None
        self._write()

    def _write(self) -> None:
        if self._refused:
            log.warning("refused %d connection%s: no file descriptor left for them (%s; open files limit %d); "
                        "%d refused since start; open connections are still served", self._refused,
                        "" if self._refused == 1 else "s", self._refused_reason, open_files_limit(),
                        self._counts.refused_out_of_fds)
        if self._paused_reason:
            log.warning("accept failed (%s): not accepting for %g s; waiting connections stay in the kernel's "
                        "queue", self._paused_reason, _PAUSE)
        if self._refused or self._paused_reason:
            self._last = self._loop.time()
        self._refused = 0
        self._paused_reason = ""
