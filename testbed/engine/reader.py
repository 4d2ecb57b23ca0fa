"""The object tier's layer stream in a separate reader process (off the engine's GIL).

Why: the prefill of a short new part is launch-bound: the engine thread spends its time in Python issuing
kernels.  Reader threads in the same process (socket reads, framing, checksum bookkeeping) compete with it
for the GIL and slowed it by 21-66 ms per 4K prefill on the H100.  Here the gather streams run in a child
process (``spawn`` context: never fork a process that has initialised CUDA) that reads straight into a shared
memory segment; the engine process maps the same segment (and registers it as pinned memory on CUDA), so the
bytes are never copied between processes.

Shared segment: an anonymous ``memfd`` (not ``/dev/shm``, which containers often cap at 64 MiB) of
``num_layers * layer_stride_bytes``; layer ``l``'s gather payload (chunk-major, ``n * slice_bytes``) is at
``[l * layer_stride_bytes, ...)``.  The child maps it through ``/proc/<engine pid>/fd/<fd>``.

Messages (``multiprocessing`` pipes, pickled tuples):

* engine -> reader: ``("load", req_id, client_kwargs, seg_path, seg_gen, seg_bytes, layer_stride_bytes,
  groups, num_layers, compute_per_layer_s, sent_monotonic_s)`` with ``groups`` = [(object names, byte offset
  of the group inside a layer)], one gather stream each; ``("cancel", req_id)``; ``("stop",)``.
* reader -> engine: ``("L", req_id, layer)`` when every group has delivered (and verified) ``layer``;
  ``("E", req_id, encoded error)`` once, for the first failure; ``("D", req_id, timings)`` when the request
  is over (after ``E`` too).  The engine blocks in ``Connection.recv`` (an ``os.read``: no GIL held while
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

# Modules whose exception classes cross the process boundary as themselves (``GatherUnsupported`` lives in
# ``testbed.client.readpaths``, ``KVLoadError`` in ``testbed.engine.kvload``).
ALLOWED_ERROR_MODULES = (
    "testbed.wire.errors",
    "testbed.client.readpaths",
    "testbed.engine.kvload",
)


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
    cancels: dict[int, threading.Event] = {}
    try:
        while True:
            try:
                msg = cmd.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "stop":
                break
            if msg[0] == "cancel":
                ev = cancels.get(msg[1])
                if ev is not None:
                    ev.set()
                continue
            # ("load", ...): one request at a time (the engine waits for "D" before the next one).
            recv_s = time.monotonic()
            _, req_id, kwargs, path, gen, size, stride, groups, num_layers, cpl, sent_s = msg
            if worker is not None:
                worker.join()
            key = tuple(sorted(kwargs.items()))
            if key not in clients:
                from testbed.client.core import ObjectCacheClient

                clients[key] = ObjectCacheClient(**kwargs)
            if (path, gen) not in maps:
                for old in maps.values():
                    with contextlib.suppress(BufferError):
                        old.close()
                maps.clear()
                with open(path, "r+b") as f:
                    maps[(path, gen)] = mmap.mmap(f.fileno(), size)
            cancels = {req_id: threading.Event()}
            worker = threading.Thread(
                target=_serve_load,
                args=(
                    sig,
                    send_lock,
                    clients[key],
                    maps[(path, gen)],
                    req_id,
                    stride,
                    groups,
                    num_layers,
                    cpl,
                ),
                kwargs={"cancel": cancels[req_id], "times": {"engine_sent_s": sent_s, "recv_s": recv_s}},
                daemon=True,
            )
            worker.start()
    finally:
        if worker is not None:
            worker.join(timeout=30)
        for c in clients.values():
            c.close()


def _serve_load(
    sig, send_lock, client, mm, req_id, stride, groups, num_layers, cpl, *, cancel, times
) -> None:
    """Run one request's gather streams (one thread per group) and report layers, the first error, the end."""
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
            nbytes = group_bytes[g]
            outs = [buf[i * stride + offset : i * stride + offset + nbytes] for i in range(num_layers)]
            stream = client.load_layers(names, out=outs, compute_per_layer_s=cpl, timings=stamps[g])
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
                    send(("L", req_id, layer))
                expected += 1
            if expected != num_layers:
                raise RuntimeError(f"object tier stream ended after {expected} of {num_layers} layers")
        except BaseException as exc:
            cancel.set()
            with lock:
                first = not error
                error.append(exc)
            if first:
                send(("E", req_id, encode_error(exc)))
        finally:
            if stream is not None:
                stream.close()
            for v in outs:
                v.release()
            end_s[g] = time.monotonic()

    group_bytes = [int(n) for _, _, n in groups]
    threads = [
        threading.Thread(target=run, args=(g, list(names), off), daemon=True)
        for g, (names, off, _) in enumerate(groups)
    ]
    times["threads_started_s"] = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with contextlib.suppress(BufferError):
        buf.release()
    times.update(first_layer_s=first_layer_s, end_s=end_s)
    times.update(
        sent_s=[st.get("sent_s") for st in stamps], response_s=[st.get("response_s") for st in stamps]
    )
    send(("D", req_id, times))


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
            self.cmd.send(("stop",))
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        for c in (self.cmd, self.sig):
            c.close()
        self.proc = self.cmd = self.sig = None
