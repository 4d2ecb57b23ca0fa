"""The save path: new full chunks -> the DRAM tier now, -> the object tier in the background.

``KVSaver``: after each layer is computed, the new full chunks' KV of that layer is permuted to the
chunk-major layout and copied device-to-host on a separate save stream straight into the DRAM tier's pinned
slots; ``wait_for_save`` (after the logits are out) registers the chunks in the DRAM tier and hands them to a
background thread that writes chunk objects (``testbed.wire.kvformat``) to the object tier.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from scheduler.keys import KeyScope, object_key
from testbed.engine.dram import DramTier


@dataclass
class SaveJob:
    """One prefill's chunks to save: ``keys`` (not yet held) are chunks ``chunks`` (indices into the prompt)
    of ``kv``, written into DRAM slots ``slots``; ``runs``: (index into ``keys``, first slot, count) runs of
    consecutive slots."""

    keys: list[str]
    chunks: list[int]
    slots: list[int]
    runs: list[tuple[int, int, int]]
    kv: list[torch.Tensor]


class KVSaver:
    """Save path: new full chunks -> DRAM tier (device-to-host on a save stream, straight into pinned slots)
    and, asynchronously, -> the object tier as chunk objects.  ``object_client`` may be ``None``."""

    def __init__(
        self, tier: DramTier | None, *, object_client=None, scope: KeyScope | None = None, dtype=None
    ):
        self.tier, self.client, self.scope = tier, object_client, scope
        if tier is None:
            raise ValueError("KVSaver needs a DRAM tier (the object tier is written from it)")
        self.spec, self.chunk_tokens, self.slice_bytes = tier.spec, tier.chunk_tokens, tier.slice_bytes
        self.cuda = tier.device.type == "cuda"
        self.stream = torch.cuda.Stream(tier.device) if self.cuda else None
        self.dtype = dtype
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="objectcache-save")
        self.pending: list[Future] = []
        self._job: SaveJob | None = None
        # New chunks not saved because the DRAM tier could not make room (full of pinned chunks).
        self.skipped_chunks = 0
        self._staging: torch.Tensor | None = None

    def begin(self, keys: Sequence[str], first_chunk: int, kv: list[torch.Tensor]) -> None:
        """Prepare to save chunks ``first_chunk .. first_chunk+len(keys)-1`` of ``kv``; the ones the tier
        already holds are not written again, only refreshed (a use and a new expiry)."""
        todo = [first_chunk + i for i, k in enumerate(keys) if k not in self.tier]
        self.tier.refresh([k for k in keys if k in self.tier], self._namespace())
        self._job = None
        if not todo:
            return
        try:
            slots = self.tier.allocate(len(todo))
        except MemoryError:  # the prefill's answer does not depend on saving: skip, count it
            self.skipped_chunks += len(todo)
            return
        runs: list[tuple[int, int, int]] = []  # (index into todo, first slot, count)
        for j, s in enumerate(slots):
            if runs and runs[-1][1] + runs[-1][2] == s:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((j, s, 1))
        keys_todo = [keys[c - first_chunk] for c in todo]
        self._job = SaveJob(keys_todo, todo, slots, runs, kv)

    def _namespace(self) -> str:
        """The namespace the DRAM tier's TTL is looked up by."""
        return self.scope.namespace if self.scope is not None else "default"

    def _chunk_major(self, kv_layer: torch.Tensor, chunks: list[int]) -> torch.Tensor:
        """``[m, 2, ct, H, D]`` view/copy of the given chunks of one layer's token-major KV."""
        s, ct = self.spec, self.chunk_tokens
        if chunks == list(range(chunks[0], chunks[0] + len(chunks))):
            c0, m = chunks[0], len(chunks)
            return (
                kv_layer[:, c0 * ct : (c0 + m) * ct]
                .view(2, m, ct, s.num_kv_heads, s.head_dim)
                .permute(1, 0, 2, 3, 4)
            )
        return torch.stack([kv_layer[:, c * ct : (c + 1) * ct] for c in chunks])

    def save_layer(self, layer: int) -> None:
        """Queue the D2H copy of ``layer``'s new chunks (call right after the layer's compute is queued):
        one permute into a device staging buffer, then one copy per run of consecutive DRAM slots."""
        if self._job is None:
            return
        chunks, runs, kv = self._job.chunks, self._job.runs, self._job.kv
        sb, dt = self.slice_bytes, kv[layer].dtype
        if not self.cuda:
            cm = self._chunk_major(kv[layer], chunks)
            for j, slot, count in runs:
                self.tier.slot_view(layer, slot, count).view(dt).view(cm[j : j + count].shape).copy_(
                    cm[j : j + count]
                )
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.tier.device))
        with torch.cuda.stream(self.stream):
            need = len(chunks) * sb
            if self._staging is None or self._staging.numel() < need:
                self._staging = torch.empty(need, dtype=torch.uint8, device=self.tier.device)
            cm = self._chunk_major(kv[layer], chunks)
            self._staging[:need].view(dt).view(cm.shape).copy_(cm)
            for j, slot, count in runs:
                self.tier.slot_view(layer, slot, count).copy_(
                    self._staging[j * sb : (j + count) * sb], non_blocking=True
                )

    def wait_for_save(self) -> list[str]:
        """Finish the DRAM copies, register the chunks, start the object-tier upload; returns saved keys."""
        if self._job is None:
            return []
        keys, slots = self._job.keys, self._job.slots
        self._job = None
        if self.cuda:
            self.stream.synchronize()
        self.tier.commit(keys, slots, self._namespace())
        if self.client is not None:
            # Pinned until encoded: an evicted slot could be reused by the next save before the upload reads it.
            self.tier.pin(keys)
            self.pending.append(self._uploads.submit(self._upload, keys))
        return keys

    def _upload(self, keys: list[str], batch_chunks: int = 16) -> int:
        """Write ``keys``' chunk objects, ``batch_chunks`` at a time (the client's parallel PUT streams take
        a batch).  A client that ``accepts_parts`` gets each object as the encoded header plus views of the
        pinned DRAM slots (``encode_chunk_parts``: each slice's xxh3 computed once, no 32 MiB copy), and the
        batch stays pinned until written; any other client gets joined bytes, unpinned once encoded."""
        from testbed.wire.kvformat import encode_chunk, encode_chunk_parts

        zero_copy = bool(getattr(self.client, "accepts_parts", False))
        encode = encode_chunk_parts if zero_copy else encode_chunk
        written, unpinned = 0, 0
        try:
            for i in range(0, len(keys), batch_chunks):  # bounded memory / pinning: a batch at a time
                batch = keys[i : i + batch_chunks]
                items = [
                    (
                        object_key(self.scope, k),
                        encode(self.spec, self.tier.chunk_layers(k), self.chunk_tokens),
                    )
                    for k in batch
                    if k
                    in self.tier.slots  # pinned since the save, so still held unless the tier was cleared
                ]
                if not zero_copy:
                    self.tier.unpin(batch)
                    unpinned = i + len(batch)
                written += self.client.put_chunks(items) if items else 0
                if zero_copy:
                    del items
                    self.tier.unpin(batch)
                    unpinned = i + len(batch)
        finally:
            self.tier.unpin(keys[unpinned:])
        return written

    def flush(self, timeout_s: float | None = None) -> int:
        """Wait for every queued object-tier write; returns objects written; re-raises upload errors."""
        written = 0
        pending, self.pending = self.pending, []
        for fut in pending:
            written += fut.result(timeout=timeout_s)
        return written

    def close(self) -> None:
        self._uploads.shutdown(wait=True)
