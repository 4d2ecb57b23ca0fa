"""The gather frame codec: the bytes on the wire, and the decoder's answers to good, cut and malformed streams."""

from __future__ import annotations

import json
import struct

import pytest

from testbed.wire import frames
from testbed.wire.errors import ChecksumMismatch, ProtocolError, TruncatedStream
from testbed.wire.kvformat import slice_checksum


def _reader(data: bytes, max_read_bytes: int | None = None):
    """A ``readinto`` over ``data`` that returns at most ``max_read_bytes`` per call (short reads)."""
    pos = 0

    def readinto(view: memoryview) -> int:
        nonlocal pos
        n = min(len(view), len(data) - pos, max_read_bytes or len(view))
        view[:n] = data[pos : pos + n]
        pos += n
        return n

    return readinto


def _stream(payloads: list[list[bytes]], first_layer: int = 0, end: bool = True) -> bytes:
    """A gather body: layer ``first_layer + j`` carries the slices ``payloads[j]``."""
    body = b""
    for j, slices in enumerate(payloads):
        sums = [slice_checksum(s) for s in slices]
        body += frames.encode_layer_head(first_layer + j, len(slices[0]), sums) + b"".join(slices)
    return body + (frames.encode_end_frame(len(payloads)) if end else b"")


def test_the_bytes_on_the_wire():
    """The format as documented, packed by hand: the codec must not drift from it."""
    head = frames.encode_layer_head(7, 3, [1, 2])
    assert head == struct.pack("<4sIIQ", b"OCLF", 7, 2, 3) + struct.pack("<2Q", 1, 2)
    assert frames.encode_error_frame("boom") == struct.pack("<4sI", b"OCER", 4) + b"boom"
    assert frames.encode_end_frame(5) == struct.pack("<4sI", b"OCEN", 5)
    assert len(frames.encode_error_frame("x" * 100_000)) == 8 + frames.MAX_ERROR_MESSAGE_BYTES
    body = _stream([[b"abc", b"def"]] * 4)
    assert frames.stream_bytes(4, 2, 3) == len(body)
    doc = json.loads(frames.encode_gather_request(["a", "b"], 1, 3, 0.004))
    assert doc == {
        "version": 1,
        "keys": ["a", "b"],
        "layer_start": 1,
        "layer_end": 3,
        "compute_per_layer_s": 0.004,
    }
    assert "layer_end" not in json.loads(frames.encode_gather_request(["a"]))


@pytest.mark.parametrize("max_read_bytes", [None, 1, 5])
def test_decoder_hands_back_payload_lengths_over_short_reads(max_read_bytes):
    payloads = [[bytes([layer, i]) * 8 for i in range(3)] for layer in range(4)]
    data = _stream(payloads, first_layer=2)
    readinto = _reader(data, max_read_bytes)
    decoder = frames.FrameDecoder(readinto, max_slices=3, first_layer=2)
    for j, slices in enumerate(payloads):
        head = decoder.next_frame()
        assert (head.layer, head.n_slices, head.slice_bytes) == (2 + j, 3, 16)
        assert head.checksums == tuple(slice_checksum(s) for s in slices)
        payload = memoryview(bytearray(head.payload_bytes))
        got = 0
        while got < len(payload):  # the caller reads the payload itself, into its own buffer
            got += readinto(payload[got:])
        assert bytes(payload) == b"".join(slices)
        assert frames.first_bad_slice(payload, head.checksums, head.slice_bytes) is None
    assert decoder.next_frame() is None
    assert decoder.layers_read == 4


def test_decoder_errors():
    good = _stream([[b"abcd"]], end=False)
    with pytest.raises(TruncatedStream, match="without an end frame") as info:
        list(frames.iter_frames(_as_read(good)))
    assert info.value.layer == 1
    with pytest.raises(TruncatedStream, match="disk on fire"):
        list(frames.iter_frames(_as_read(good + frames.encode_error_frame("disk on fire"))))
    with pytest.raises(ProtocolError, match="end frame says 2"):
        list(frames.iter_frames(_as_read(good + frames.encode_end_frame(2))))
    with pytest.raises(ProtocolError, match="magic"):
        list(frames.iter_frames(_as_read(good + b"XXXX\0\0\0\0")))
    with pytest.raises(TruncatedStream, match="inside layer 0"):
        list(frames.iter_frames(_as_read(good[:-2])))
    with pytest.raises(TruncatedStream, match="checksums"):
        list(frames.iter_frames(_as_read(good[:24])))
    huge = struct.pack("<4sIIQ", b"OCLF", 0, 1 << 30, 4)
    with pytest.raises(ProtocolError, match="slices"):  # refused before its checksum array is allocated
        frames.FrameDecoder(_reader(huge), max_slices=16).next_frame()


def test_verify_frame_names_key_and_layer():
    body = _stream([[b"good", b"good"]])
    (frame,) = frames.iter_frames(_as_read(body))
    frames.verify_frame(frame, ["k0", "k1"])
    bad = frames.LayerFrame(frame.layer, 4, frame.checksums, memoryview(b"goodgooD"))
    assert frames.first_bad_slice(bad.payload, bad.checksums, 4) == (1, slice_checksum(b"gooD"))
    with pytest.raises(ChecksumMismatch, match="k1 layer 0") as info:
        frames.verify_frame(bad, ["k0", "k1"])
    assert (info.value.key, info.value.layer) == ("k1", 0)


def _as_read(data: bytes):
    """A ``read(n) -> bytes`` over ``data`` (fewer bytes only at the end)."""
    view, pos = memoryview(data), 0

    def read(n: int) -> bytes:
        nonlocal pos
        out = bytes(view[pos : pos + n])
        pos += len(out)
        return out

    return read
