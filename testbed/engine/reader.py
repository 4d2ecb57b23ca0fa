"""The object tier's layer stream in a separate reader process (off the engine's GIL).

Why: the prefill of a short new part is launch-bound: the engine thread spends its time in Python issuing
kernels.  Reader threads in the same process (socket reads, framing, checksum bookkeeping) compete with it
for the GIL and slow it down (docs/engine.md has the H100 measurement).  Here the gather streams run in a child
process (``spawn`` context: never fork a process that has initialised CUDA) that reads straight into a shared
memory segment; the engine process maps the same segment (and registers it as pinned memory on CUDA), so the
bytes are never copied between processes.

Shared segment: an anonymous ``memfd`` (not ``/dev/shm``, which containers often cap at 64 MiB) of
``num_layers * layer_stride_bytes``; layer ``l``'s gather payload (chunk-major, ``n * slice_bytes``) is at
``[l * layer_stride_bytes, ...)``.  The child maps it through ``/proc/<engine pid>/fd/<fd>``.

Messages (``multiprocessing`` pipes, pickled dataclasses of this module):

* engine -> reader: ``LoadCommand`` (one request: the client's settings, the segment, and its
  ``GatherGroup``s, one gather stream each); ``CancelCommand``; ``StopCommand``.
* reader -> engine: ``LayerReady`` when every group has delivered (and verified) a layer; ``LoadFailed``
  once, for the first failure; ``LoadDone`` (with ``ReaderTimings``) when the request is over (after
  ``LoadFailed`` too).  The engine blocks in ``Connection.recv`` (an ``os.read``: no GIL held while
  waiting).

Errors cross the process boundary as (module, class name, message, attributes) and are rebuilt as the same
``testbed.wire.errors`` classes (``ChunkMissing``, ``ChecksumMismatch``, ``StorageUnavailable`` ...), so the
engine's fallback to recompute sees exactly what the in-process reader would raise.

This module imports no torch: the reader process stays small and starts in about a second.
"""

from __future__ import annotations

import contextlib
import importlib
import mmap
import multiprocessing
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# Gather streams of one request at most (the object source's ``streams``; more wait for a free thread).
MAX_STREAM_THREADS = 32

# Modules whose exception classes cross the process boundary as themselves (the client's errors, including
# ``GatherUnsupported``, live in ``testbed.wire.errors``; ``KVLoadError`` in ``testbed.engine.kvload``).
ALLOWED_ERROR_MODULES = (
    "testbed.wire.errors",
    "testbed.engine.kvload",
)


@dataclass(frozen=True)
class GatherGroup:
    """One gather stream of a request: ``object_names`` (consecutive chunks of the prefix) land at
    ``offset_bytes`` inside every layer's region of the segment, ``layer_bytes`` per layer."""

    object_names: list[str]
    offset_bytes: int
    layer_bytes: int


@dataclass(frozen=True)
class LoadCommand:
    """Engine -> reader: load one request's layers into the shared segment.

    ``client_kwargs``: ``ObjectCacheClient(**client_kwargs)`` (the reader keeps one client per setting).
    ``segment_path`` / ``segment_generation`` / ``segment_bytes``: the segment to map (a new generation is
    a new segment); layer ``l`` starts at ``l * layer_stride_bytes``.  ``compute_per_layer_s``: passed to
    the client for pacing (s, ``None``: unpaced).  ``sent_monotonic_s``: ``time.monotonic()`` when sent.
    """

    req_id: int
    client_kwargs: dict
    segment_path: str
    segment_generation: int
    segment_bytes: int
    layer_stride_bytes: int
    groups: list[GatherGroup]
    num_layers: int
    compute_per_layer_s: float | None
    sent_monotonic_s: float


@dataclass(frozen=True)
class CancelCommand:
    """Engine -> reader: stop request ``req_id`` (each gather stream closes at its next layer)."""

    req_id: int


@dataclass(frozen=True)
class StopCommand:
    """Engine -> reader: exit."""


@dataclass(frozen=True)
class LayerReady:
    """Reader -> engine: every group of request ``req_id`` has delivered and verified ``layer``."""

    req_id: int
    layer: int
    arrived_s: float | None = None  # time.monotonic() when the last group delivered it


@dataclass(frozen=True)
class LoadFailed:
    """Reader -> engine: the first failure of request ``req_id`` (``encode_error``'s tuple)."""

    req_id: int
    error: tuple[str, str, str, dict]


@dataclass
class ReaderTimings:
    """``time.monotonic()`` stamps (s) of one request in the reader (``None``: did not happen).
    ``engine_sent_s``: the engine sent the command; ``recv_s``: the reader received it;
    ``threads_started_s``: its gather streams were handed to the reader's threads; per group: ``sent_s`` (request sent),
    ``response_s`` (response headers: the server has checked every object, or an early stream's first
    few), ``first_byte_s`` (the first layer frame's head), ``first_layer_s``, ``end_s``."""

    engine_sent_s: float
    recv_s: float
    threads_started_s: float | None = None
    sent_s: list[float | None] = field(default_factory=list)
    response_s: list[float | None] = field(default_factory=list)
    first_byte_s: list[float | None] = field(default_factory=list)
    first_layer_s: list[float | None] = field(default_factory=list)
    end_s: list[float | None] = field(default_factory=list)

    def ms_since(self, t0_s: float) -> dict:
        """The stamps as ms after ``t0_s`` (the engine's ``start_load``), under ``LoadStats.timings_ms``'s
        names: ``ipc``, ``threads_started``, per group ``request_sent`` / ``response_headers`` /
        ``first_layer``, and ``last_group_end``."""

        def ms(x: float | None) -> float | None:
            return None if x is None else (x - t0_s) * 1e3

        return {
            "ipc": ms(self.recv_s),
            "threads_started": ms(self.threads_started_s),
            "request_sent": [ms(x) for x in self.sent_s],
            "response_headers": [ms(x) for x in self.response_s],
            "first_byte": [ms(x) for x in self.first_byte_s],
            "first_layer": [ms(x) for x in self.first_layer_s],
            "last_group_end": max((ms(x) for x in self.end_s if x is not None), default=None),
        }


@dataclass(frozen=True)
class LoadDone:
    """Reader -> engine: request ``req_id`` is over (also after ``LoadFailed``)."""

    req_id: int
    timings: ReaderTimings


class SharedSegment:
    """``size_bytes`` of anonymous shared memory (memfd), mapped in this process; ``path`` maps it elsewhere."""

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.fd = os.memfd_create("objectcache-layers", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size_bytes)
        self.mm = mmap.mmap(self.fd, size_bytes)
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self) -> None:
        # A tensor may still view it: then the mapping lives until that is collected.
        with contextlib.suppress(BufferError):
            self.mm.close()
        os.close(self.fd)


def encode_error(exc: BaseException) -> tuple[str, str, str, dict]:
    """(module, class name, message, attributes) of an exception, for rebuilding in another process."""
    attrs = {
        k: v for k, v in vars(exc).items() if isinstance(v, str | int | float | bool | list | type(None))
    }
    return type(exc).__module__, type(exc).__qualname__, str(exc), attrs


def decode_error(enc: tuple[str, str, str, dict], fallback: type[Exception]) -> Exception:
    """The exception ``encode_error`` described: the same class when it is one of ours, else ``fallback``."""
    module, name, message, attrs = enc
    cls = None
    if module in ALLOWED_ERROR_MODULES:
        cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return fallback(f"reader process: {module}.{name}: {message}")
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(attrs)
    return exc


# ---- the reader process ------------------------------------------------------------------------------------
def reader_main(cmd, sig) -> None:
    """Entry point of the reader process: serve load requests until ``stop`` or the engine goes away."""
    clients: dict[tuple, object] = {}
    maps: dict[tuple[str, int], mmap.mmap] = {}
    send_lock = threading.Lock()
    worker: threading.Thread | None = None
    # The gather streams run on threads that outlive a request: starting a thread waits for the GIL, which
    # the streams already started hold while they sign and send, so fresh threads per request start one
    # after another (the last of 4 gathers left 4.5 ms after the threads were started on the H200 host).
    streams_pool = ThreadPoolExecutor(MAX_STREAM_THREADS, thread_name_prefix="objectcache-stream")
    cancels: dict[int, threading.Event] = {}
    try:
        while True:
            try:
                msg = cmd.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, StopCommand):
                break
            if isinstance(msg, CancelCommand):
                ev = cancels.get(msg.req_id)
                if ev is not None:
                    ev.set()
                continue
            # A LoadCommand: one request at a time (the engine waits for LoadDone before the next one).
            timings = ReaderTimings(engine_sent_s=msg.sent_monotonic_s, recv_s=time.monotonic())
            if worker is not None:
                worker.join()
            key = tuple(sorted(msg.client_kwargs.items()))
            if key not in clients:
                from testbed.client.core import ObjectCacheClient

                clients[key] = ObjectCacheClient(**msg.client_kwargs)
            seg = (msg.segment_path, msg.segment_generation)
            if seg not in maps:
                for old in maps.values():
                    with contextlib.suppress(BufferError):
                        old.close()
                maps.clear()
                with open(msg.segment_path, "r+b") as f:
                    maps[seg] = mmap.mmap(f.fileno(), msg.segment_bytes)
            cancels = {msg.req_id: threading.Event()}
            worker = threading.Thread(
                target=_serve_load,
                args=(sig, send_lock, clients[key], maps[seg], msg, streams_pool),
                kwargs={"cancel": cancels[msg.req_id], "timings": timings},
                daemon=True,
            )
            worker.start()
    finally:
        if worker is not None:
            worker.join(timeout=30)
        streams_pool.shutdown(wait=False, cancel_futures=True)
        for c in clients.values():
            c.close()


def _serve_load(
    sig,
    send_lock,
    client,
    mm,
    cmd: LoadCommand,
    pool: ThreadPoolExecutor,
    *,
    cancel: threading.Event,
    timings: ReaderTimings,
) -> None:
    """Run one request's gather streams (one thread per group) and report layers, the first error, the end."""
    req_id, stride, groups, num_layers = cmd.req_id, cmd.layer_stride_bytes, cmd.groups, cmd.num_layers
    pace_group = new_pace_group(len(groups))
    buf = memoryview(mm)
    delivered = [0] * num_layers
    lock = threading.Lock()
    first_layer_s = [None] * len(groups)
    stamps: list[dict] = [{} for _ in groups]  # the client's per-gather stamps (sent, response headers)
    end_s = [None] * len(groups)
    error: list[BaseException] = []

    def send(obj) -> None:
        with send_lock:
            sig.send(obj)

    def run(g: int, names: list[str], offset: int) -> None:
        stream = None
        outs: list[memoryview] = []
        try:
            expected = 0
            nbytes = groups[g].layer_bytes
            outs = [buf[i * stride + offset : i * stride + offset + nbytes] for i in range(num_layers)]
            stream = client.load_layers(
                names,
                out=outs,
                compute_per_layer_s=cmd.compute_per_layer_s,
                timings=stamps[g],
                pace_group=pace_group,
            )
            for layer, view in stream:
                if cancel.is_set():
                    return
                if expected == 0:
                    first_layer_s[g] = time.monotonic()
                got = memoryview(view).nbytes
                if layer != expected or got != nbytes:
                    raise RuntimeError(
                        f"reader got layer {layer} ({got} B), expected {expected} ({nbytes} B)"
                    )
                if _address(view) != _address(outs[layer]):
                    outs[layer][:] = view  # the client used its own buffer (a fallback path)
                with lock:
                    delivered[layer] += 1
                    done = delivered[layer] == len(groups)
                if done:
                    send(LayerReady(req_id, layer, time.monotonic()))
                expected += 1
            if expected != num_layers:
                raise RuntimeError(f"object tier stream ended after {expected} of {num_layers} layers")
        except BaseException as exc:
            cancel.set()
            with lock:
                first = not error
                error.append(exc)
            if first:
                send(LoadFailed(req_id, encode_error(exc)))
        finally:
            if stream is not None:
                stream.close()
            for v in outs:
                v.release()
            end_s[g] = time.monotonic()

    timings.threads_started_s = time.monotonic()
    futures = [pool.submit(run, g, list(grp.object_names), grp.offset_bytes) for g, grp in enumerate(groups)]
    for f in futures:
        f.result()  # ``run`` reports its own errors
    with contextlib.suppress(BufferError):
        buf.release()
    timings.first_layer_s, timings.end_s = first_layer_s, end_s
    timings.sent_s = [st.get("sent_s") for st in stamps]
    timings.response_s = [st.get("response_s") for st in stamps]
    timings.first_byte_s = [st.get("first_byte_s") for st in stamps]
    send(LoadDone(req_id, timings))


def new_pace_group(streams: int) -> str | None:
    """A fresh pace-group id for a request of ``streams`` gather streams (None for one stream): the server
    paces a request's streams as one flow (``testbed.objectstore.pacer``)."""
    return uuid.uuid4().hex if streams > 1 else None


def _address(view) -> int:
    import numpy as np

    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class ReaderProcess:
    """The engine's handle on one reader process (started lazily, restarted if it dies)."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self.proc = None
        self.cmd = self.sig = None

    def ensure_started(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            return
        self.close()
        cmd_parent, cmd_child = self._ctx.Pipe()
        sig_r, sig_w = self._ctx.Pipe(duplex=False)
        self.proc = self._ctx.Process(
            target=reader_main, args=(cmd_child, sig_w), name="objectcache-reader", daemon=True
        )
        self.proc.start()
        cmd_child.close()  # so the engine sees EOF on sig if the reader dies
        sig_w.close()
        self.cmd, self.sig = cmd_parent, sig_r

    def send(self, msg) -> None:
        self.cmd.send(msg)

    def recv(self, timeout_s: float | None = None):
        """The next message; None on timeout; raises EOFError if the reader died."""
        if timeout_s is not None and not self.sig.poll(timeout_s):
            return None
        return self.sig.recv()

    def poll(self) -> bool:
        return self.sig.poll()

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.cmd.send(StopCommand())
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        for c in (self.cmd, self.sig):
            c.close()
        self.proc = self.cmd = self.sig = None
