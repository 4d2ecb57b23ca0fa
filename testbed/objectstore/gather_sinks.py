"""How a gather stream's bytes reach the client: sinks that take lists of *parts* (frame heads, buffers, file
ranges) and send them in order.

``SocketSink`` writes straight to the connection's socket from a worker thread (``os.sendfile`` for file
ranges, zero copy from the page cache), optionally paced by the ``Pacer`` piece by piece inside that thread;
``WriterSink`` goes through an awaitable ``write`` (aiohttp's ``StreamResponse.write``: TLS, tests).
``testbed.objectstore.gather.stream_gather`` decides what to send; the sinks only send it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor

from testbed.objectstore.paced_stream import PacedStream
from testbed.objectstore.pacer import Pacer

Part = bytes | bytearray | memoryview | tuple[int, int, int]  # bytes, or (file descriptor, offset, count)


class WriterSink:
    """Sends parts through an awaitable ``write(bytes)`` (aiohttp's ``StreamResponse.write``, or a test).

    File ranges are not supported (``can_sendfile`` is False): the buffered path is used.
    """

    can_sendfile = False

    def __init__(self, write: Callable[[bytes | memoryview], Awaitable[None]]) -> None:
        self._write = write

    async def send(self, parts: Sequence[Part]) -> None:
        for part in parts:
            await self._write(part)

    async def send_groups(
        self, groups: Sequence[Sequence[Part]], on_group_sent: Callable[[int], None]
    ) -> None:
        for i, parts in enumerate(groups):
            await self.send(parts)
            on_group_sent(i)


class SocketSink:
    """Sends parts straight to a connected non-blocking socket from a worker thread.

    One thread hop per call moves a whole list of parts (a frame header and the file ranges or buffer of a
    layer): ``os.sendfile`` for file ranges (zero copy from the page cache), ``socket.send`` for buffers (no
    copy into an asyncio buffer).  The event loop's transport must not hold unsent bytes meanwhile
    (``send`` waits until its buffer is empty).  A peer that accepts nothing for ``stall_timeout_s`` is
    dropped (``TimeoutError``); a closed peer raises ``ConnectionResetError``.
    """

    can_sendfile = True

    def __init__(
        self, transport, executor: Executor | None, stall_timeout_s: float = 60.0, sndbuf_bytes: int = 4 << 20
    ) -> None:
        self._transport = transport
        self._sock = transport.get_extra_info("socket")
        self._executor = executor
        self.stall_timeout_s = stall_timeout_s
        with contextlib.suppress(OSError):
            # No Nagle: a small frame (the end frame) after a large send must not wait for the peer's
            # delayed ACK (up to 200 ms on Linux).
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sndbuf_bytes:
            # A larger send buffer means fewer wake-ups per MiB (~+30% on loopback here).
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf_bytes)

    @classmethod
    def usable(cls, transport) -> bool:
        """A plain TCP transport (no TLS) whose socket we can write to directly."""
        return (
            transport is not None
            and transport.get_extra_info("socket") is not None
            and transport.get_extra_info("sslcontext") is None
        )

    async def send(self, parts: Sequence[Part]) -> None:
        await self.send_groups([parts])

    async def send_groups(
        self,
        groups: Sequence[Sequence[Part]],
        on_group_sent: Callable[[int], None] | None = None,
        pacing: tuple[Pacer, PacedStream, int] | None = None,
    ) -> None:
        """Send several groups (e.g. whole layers) in one thread hop; ``on_group_sent(i)`` runs on the event
        loop after group ``i`` is handed to the kernel.  No gaps between groups waiting for the loop.

        ``pacing=(pacer, stream, floor_bytes)``: payload parts (file ranges and buffers; not the small frame
        heads, which are sent as they come) go in rate-scaled pieces, each after ``pacer.pace_blocking`` in
        this thread, so a paced stream costs one thread hop, not one per piece.

        The thread works on duplicates of the socket and file descriptors, taken here on the event loop: if
        the connection is torn down or the caller closes its files meanwhile (cancellation), the thread can
        never write to or read from an unrelated descriptor that reused the number.
        """
        t = self._transport
        if t is None or t.is_closing():
            raise ConnectionResetError("client went away")
        while t.get_write_buffer_size():  # e.g. response headers still queued in the transport
            await asyncio.sleep(0.0005)
        loop = asyncio.get_running_loop()
        dups: dict[int, int] = {}
        try:
            sock_fd = os.dup(self._sock.fileno())
        except (OSError, ValueError):
            raise ConnectionResetError("client went away") from None
        try:
            for parts in groups:
                for p in parts:
                    if isinstance(p, tuple) and p[0] not in dups:
                        dups[p[0]] = os.dup(p[0])
        except BaseException:
            for fd in [sock_fd, *dups.values()]:
                os.close(fd)
            raise
        stop = threading.Event()
        pace = None
        if pacing is not None and pacing[0].limited:
            pacer, stream, floor_bytes = pacing

            def starved() -> None:
                loop.call_soon_threadsafe(pacer.reallocate)

            def pace(n: int) -> None:
                pacer.pace_blocking(stream, n, stop.wait, starved)
                if stop.is_set():
                    raise ConnectionResetError("gather cancelled")

            def next_piece_bytes() -> int:
                return pacer.piece_bytes(stream, floor_bytes)

        def run() -> None:
            try:
                for i, parts in enumerate(groups):
                    if stop.is_set():
                        raise ConnectionResetError("gather cancelled")
                    own = [(dups[p[0]], p[1], p[2]) if isinstance(p, tuple) else p for p in parts]
                    if pace is None:
                        self._send_blocking(sock_fd, own)
                    else:
                        self._send_paced(sock_fd, own, pace, next_piece_bytes)
                    if on_group_sent is not None:
                        loop.call_soon_threadsafe(on_group_sent, i)
            finally:
                for fd in [sock_fd, *dups.values()]:
                    os.close(fd)

        try:
            await loop.run_in_executor(self._executor, run)
        except asyncio.CancelledError:
            stop.set()
            raise

    def _send_paced(
        self, fd: int, parts: list[Part], pace: Callable[[int], None], next_piece_bytes: Callable[[], int]
    ) -> None:
        """Like ``_send_blocking``, but payload parts go in pieces of ``next_piece_bytes()`` bytes, ``pace(n)``
        first (``n`` bytes)."""
        for i, part in enumerate(parts):
            if i == 0:
                self._send_blocking(fd, [part])  # the frame head: not paced (it is not payload)
                continue
            if isinstance(part, tuple):
                src, offset, count = part
                while count:
                    n = min(count, next_piece_bytes())
                    pace(n)
                    self._send_blocking(fd, [(src, offset, n)])
                    offset += n
                    count -= n
            else:
                view = memoryview(part).cast("B")
                while view:
                    n = min(len(view), next_piece_bytes())
                    pace(n)
                    self._send_blocking(fd, [view[:n]])
                    view = view[n:]

    def _send_blocking(self, fd: int, parts: list[Part]) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        timeout_ms = int(self.stall_timeout_s * 1000)
        for part in parts:
            if isinstance(part, tuple):
                src, offset, count = part
                while count:
                    try:
                        n = os.sendfile(fd, src, offset, count)
                    except BlockingIOError:
                        n = -1
                    if n == 0:
                        raise ConnectionResetError("short sendfile: file truncated or peer closed")
                    if n < 0:
                        if not poller.poll(timeout_ms):
                            raise TimeoutError("client stopped reading")
                        continue
                    offset += n
                    count -= n
            else:
                view = memoryview(part).cast("B")
                while view:
                    try:
                        n = os.write(fd, view)
                    except BlockingIOError:
                        if not poller.poll(timeout_ms):
                            raise TimeoutError("client stopped reading") from None
                        continue
                    view = view[n:]
