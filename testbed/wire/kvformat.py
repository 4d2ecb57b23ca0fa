"""The KV chunk object format: one object per chunk, a versioned header, then the layers back to back.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"OCKV"
    4       2     version (u16, = 1)
    6       2     flags (u16, 0; reserved)
    8       4     header_bytes (u32): total header size, a multiple of 4096 so the payload is page-aligned
    12      16    model fingerprint (16 ASCII hex digits, ModelSpec.fingerprint())
    28      4     chunk_tokens (u32)
    32      4     num_layers (u32)
    36      4     num_kv_heads (u32)
    40      4     head_dim (u32)
    44      1     dtype code (u8): 1 bf16, 2 fp16, 3 fp32, 4 fp8 (e4m3)
    45      3     zero padding
    48      8     slice_bytes (u64) = 2 * chunk_tokens * num_kv_heads * head_dim * dtype_bytes
    56      8*L   xxh3_64 of each layer slice, layer 0 first
    56+8L   8     xxh3_64 of header bytes [0, 56+8L)
    ...           zero padding up to header_bytes

Layer ``l`` is the byte range ``[header_bytes + l*slice_bytes, header_bytes + (l+1)*slice_bytes)``: K then V
of that layer, each ``[chunk_tokens, num_kv_heads, head_dim]`` row-major in the model dtype.  Because a layer
is one byte range, a plain S3 server can serve it with a ranged GET, and the gather server can read it with a
single ``pread``.  The per-slice checksums travel with the data in gather frames, so the client verifies each
slice end to end against what the writer stored.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from scheduler.geometry import DEFAULT_CHUNK_TOKENS, ModelSpec
from testbed.wire.errors import ChecksumMismatch, CorruptObject, GeometryMismatch

MAGIC = b"OCKV"
VERSION = 1
ALIGN_BYTES = 4096
# A reader fetches this many bytes to get the whole header of any model with up to 503 layers.
HEADER_PROBE_BYTES = 4096
MAX_HEADER_BYTES = 1 << 20  # what a streaming verifier accepts as a header size

_FIXED = struct.Struct("<4sHHI16sIIIIB3xQ")  # 56 bytes
_U64 = struct.Struct("<Q")

DTYPES: dict[str, tuple[int, int]] = {"bf16": (1, 2), "fp16": (2, 2), "fp32": (3, 4), "fp8": (4, 1)}
_DTYPE_BY_CODE = {code: name for name, (code, _) in DTYPES.items()}
_DEFAULT_DTYPE_BY_BYTES = {2: "bf16", 4: "fp32", 1: "fp8"}


def slice_checksum(data) -> int:
    """xxh3_64 of one layer slice (any bytes-like object)."""
    return xxhash.xxh3_64_intdigest(data)


def header_size(num_layers: int) -> int:
    raw = _FIXED.size + 8 * num_layers + 8
    return -(-raw // ALIGN_BYTES) * ALIGN_BYTES


@dataclass(frozen=True)
class ChunkHeader:
    """Decoded header of one chunk object."""

    fingerprint: str
    chunk_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    slice_bytes: int
    checksums: tuple[int, ...]
    header_bytes: int
    flags: int = 0
    version: int = VERSION

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + self.num_layers * self.slice_bytes

    def layer_range(self, layer: int) -> tuple[int, int]:
        """[start, end) byte offsets of layer ``layer`` in the object."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        start = self.header_bytes + layer * self.slice_bytes
        return start, start + self.slice_bytes

    def geometry(self) -> tuple:
        """What two chunks of one gather must agree on."""
        return (
            self.fingerprint,
            self.chunk_tokens,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.slice_bytes,
        )

    def matches(self, model: ModelSpec, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> bool:
        return (
            self.fingerprint == model.fingerprint()
            and self.chunk_tokens == chunk_tokens
            and self.num_layers == model.num_layers
            and self.num_kv_heads == model.num_kv_heads
            and self.head_dim == model.head_dim
            and self.dtype_bytes == model.dtype_bytes
        )

    def encode(self) -> bytes:
        code = DTYPES[self.dtype][0]
        fixed = _FIXED.pack(
            MAGIC,
            self.version,
            self.flags,
            self.header_bytes,
            self.fingerprint.encode("ascii"),
            self.chunk_tokens,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            code,
            self.slice_bytes,
        )
        body = fixed + b"".join(_U64.pack(c) for c in self.checksums)
        body += _U64.pack(xxhash.xxh3_64_intdigest(body))
        return body + bytes(self.header_bytes - len(body))


def model_dtype(model: ModelSpec) -> str:
    return _DEFAULT_DTYPE_BY_BYTES[model.dtype_bytes]


def make_header(
    model: ModelSpec,
    checksums: Sequence[int],
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    dtype: str | None = None,
) -> ChunkHeader:
    dtype = dtype or model_dtype(model)
    if DTYPES[dtype][1] != model.dtype_bytes:
        raise GeometryMismatch(f"dtype {dtype} is not {model.dtype_bytes} bytes wide")
    if len(checksums) != model.num_layers:
        raise GeometryMismatch(f"need {model.num_layers} checksums, got {len(checksums)}")
    return ChunkHeader(
        fingerprint=model.fingerprint(),
        chunk_tokens=chunk_tokens,
        num_layers=model.num_layers,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        dtype=dtype,
        slice_bytes=model.kv_bytes_per_chunk_layer(chunk_tokens),
        checksums=tuple(int(c) for c in checksums),
        header_bytes=header_size(model.num_layers),
    )


def encode_chunk(
    model: ModelSpec,
    layers: Sequence,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    dtype: str | None = None,
) -> bytes:
    """Build a chunk object from one bytes-like per layer (K then V of that layer, ``slice_bytes`` each)."""
    slice_bytes = model.kv_bytes_per_chunk_layer(chunk_tokens)
    views = [memoryview(layer).cast("B") for layer in layers]
    if len(views) != model.num_layers:
        raise GeometryMismatch(f"need {model.num_layers} layers, got {len(views)}")
    for i, v in enumerate(views):
        if v.nbytes != slice_bytes:
            raise GeometryMismatch(f"layer {i}: {v.nbytes} bytes, expected slice_bytes={slice_bytes}")
    header = make_header(model, [slice_checksum(v) for v in views], chunk_tokens, dtype)
    out = bytearray(header.total_bytes)
    out[: header.header_bytes] = header.encode()
    for layer, v in enumerate(views):
        start, end = header.layer_range(layer)
        out[start:end] = v
    return bytes(out)


def encode_chunk_parts(
    model: ModelSpec,
    layers: Sequence,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    dtype: str | None = None,
) -> list[memoryview]:
    """The chunk object ``encode_chunk`` builds, as parts to send back to back without copying: the encoded
    header, then the caller's layer buffers (views of them; they must not change until the parts are sent).
    Each slice's checksum is computed once, here."""
    slice_bytes = model.kv_bytes_per_chunk_layer(chunk_tokens)
    views = [memoryview(layer).cast("B") for layer in layers]
    if len(views) != model.num_layers:
        raise GeometryMismatch(f"need {model.num_layers} layers, got {len(views)}")
    for i, v in enumerate(views):
        if v.nbytes != slice_bytes:
            raise GeometryMismatch(f"layer {i}: {v.nbytes} bytes, expected slice_bytes={slice_bytes}")
    header = make_header(model, [slice_checksum(v) for v in views], chunk_tokens, dtype)
    return [memoryview(header.encode()), *views]


class ChunkVerifier:
    """Checks a chunk object as its bytes stream past (``update`` with consecutive pieces, then ``verify``):
    the header, the total size it declares, and every slice's xxh3 against the header, with no second pass
    and no copy beyond the header.  Raises ``CorruptObject`` / ``ChecksumMismatch``."""

    def __init__(self, key: str = "?") -> None:
        self.key = key
        self._head = bytearray()
        self.header: ChunkHeader | None = None
        self._layer = 0
        self._in_slice = 0
        self._hash = xxhash.xxh3_64()
        self.size_bytes = 0
        self.header_raw = b""  # the header's bytes as received (its slice checksums name the content)

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        self.size_bytes += view.nbytes
        while self.header is None and view.nbytes:  # gather the header (its size is in its first 12 bytes)
            want = 12
            if len(self._head) >= 12:
                want = declared_header_bytes(self._head)
                if not _FIXED.size < want <= MAX_HEADER_BYTES:
                    raise CorruptObject(f"chunk {self.key}: bad header_bytes {want}", key=self.key)
            take = min(view.nbytes, want - len(self._head))
            self._head += view[:take]
            view = view[take:]
            if len(self._head) == want and want > 12:
                self.header = parse_header(self._head)
                self.header_raw = bytes(self._head)
                self._head = bytearray()
        if self.header is None:
            return
        h, sb = self.header, self.header.slice_bytes
        while view.nbytes:
            if self._layer >= h.num_layers:
                raise CorruptObject(f"chunk {self.key}: longer than its header says", key=self.key)
            take = min(view.nbytes, sb - self._in_slice)
            self._hash.update(view[:take])
            view = view[take:]
            self._in_slice += take
            if self._in_slice == sb:
                if self._hash.intdigest() != h.checksums[self._layer]:
                    raise ChecksumMismatch(
                        f"chunk {self.key} layer {self._layer}: checksum mismatch",
                        key=self.key,
                        layer=self._layer,
                    )
                self._hash.reset()
                self._in_slice = 0
                self._layer += 1

    def verify(self) -> ChunkHeader:
        """The header, once every byte arrived and matched; raises if the object is short or not a chunk."""
        if self.header is None or self._layer != self.header.num_layers or self._in_slice:
            raise CorruptObject(
                f"chunk {self.key}: {self.size_bytes} bytes, shorter than its header says", key=self.key
            )
        return self.header


def parse_header(buf) -> ChunkHeader:
    """Decode and validate a header from the first bytes of an object (at least the header's size)."""
    view = memoryview(buf).cast("B")
    if view.nbytes < _FIXED.size:
        raise CorruptObject(f"object too short for a KV chunk header ({view.nbytes} bytes)")
    magic, version, flags, header_bytes, fp, tokens, layers, heads, head_dim, code, slice_bytes = (
        _FIXED.unpack_from(view)
    )
    if magic != MAGIC:
        raise CorruptObject(f"not a KV chunk object (magic {bytes(magic)!r})")
    if version != VERSION:
        raise CorruptObject(f"unsupported KV chunk format version {version}")
    end = _FIXED.size + 8 * layers
    if layers == 0 or header_bytes < end + 8 or header_bytes % ALIGN_BYTES:
        raise CorruptObject(f"bad header_bytes {header_bytes} for {layers} layers")
    if view.nbytes < end + 8:
        raise CorruptObject(f"header truncated: need {end + 8} bytes, got {view.nbytes}")
    (stored,) = _U64.unpack_from(view, end)
    if xxhash.xxh3_64_intdigest(view[:end]) != stored:
        raise CorruptObject("header checksum mismatch")
    if code not in _DTYPE_BY_CODE:
        raise CorruptObject(f"unknown dtype code {code}")
    dtype = _DTYPE_BY_CODE[code]
    if slice_bytes != 2 * tokens * heads * head_dim * DTYPES[dtype][1]:
        raise CorruptObject(f"slice_bytes {slice_bytes} does not match the geometry")
    try:
        fingerprint = bytes(fp).decode("ascii")
    except UnicodeDecodeError:
        raise CorruptObject("fingerprint is not ASCII") from None
    checksums = struct.unpack_from(f"<{layers}Q", view, _FIXED.size)
    return ChunkHeader(
        fingerprint,
        tokens,
        layers,
        heads,
        head_dim,
        dtype,
        slice_bytes,
        checksums,
        header_bytes,
        flags,
        version,
    )


def declared_header_bytes(buf) -> int:
    """The ``header_bytes`` field of an object's first bytes (at least 12): how many bytes hold the whole
    header, so a reader that fetched ``HEADER_PROBE_BYTES`` knows whether it has all of it.  Raises
    ``CorruptObject`` if the bytes do not start a KV chunk object."""
    view = memoryview(buf).cast("B")
    if view.nbytes < 12 or bytes(view[:4]) != MAGIC:
        raise CorruptObject(f"not a KV chunk object (magic {bytes(view[:4])!r})")
    return int.from_bytes(view[8:12], "little")


def verify_slice(header: ChunkHeader, layer: int, data, key: str = "?") -> None:
    """Raise ``ChecksumMismatch`` naming ``key`` and ``layer`` unless ``data`` is that layer's stored bytes."""
    if memoryview(data).nbytes != header.slice_bytes:
        raise ChecksumMismatch(
            f"chunk {key} layer {layer}: {memoryview(data).nbytes} bytes, expected {header.slice_bytes}",
            key=key,
            layer=layer,
        )
    if slice_checksum(data) != header.checksums[layer]:
        raise ChecksumMismatch(f"chunk {key} layer {layer}: checksum mismatch", key=key, layer=layer)


def decode_chunk(blob, key: str = "?", verify: bool = True) -> tuple[ChunkHeader, list[memoryview]]:
    """Header and one memoryview per layer of a whole chunk object, checksums verified by default."""
    view = memoryview(blob).cast("B")
    header = parse_header(view)
    if view.nbytes != header.total_bytes:
        raise CorruptObject(f"chunk {key}: {view.nbytes} bytes, header says {header.total_bytes}", key=key)
    layers = []
    for layer in range(header.num_layers):
        start, end = header.layer_range(layer)
        if verify:
            verify_slice(header, layer, view[start:end], key)
        layers.append(view[start:end])
    return header, layers
