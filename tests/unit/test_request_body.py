"""The request-body decoder on bytes alone: round trips, limits, corrupt and unsupported input."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy.request_body import BodyError, decode_body

LIMIT = 1 << 20


def gzip(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def zstd_streamed(data: bytes) -> bytes:
    # A streaming encoder (as Codex uses) writes no content size in the frame header.
    c = zstandard.ZstdCompressor(level=3).compressobj()
    return c.compress(data) + c.flush()


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip,
    "deflate": zlib.compress,
    "raw-deflate": raw_deflate,
    "zstd": zstd,
    "zstd-streamed": zstd_streamed,
}
HEADER = {"raw-deflate": "deflate", "zstd-streamed": "zstd"}


def error(raw: bytes, encoding: str, limit: int = LIMIT) -> BodyError:
    with pytest.raises(BodyError) as caught:
        decode_body(raw, encoding, limit)
    return caught.value


@given(data=st.binary(max_size=5000), name=st.sampled_from(sorted(ENCODERS)))
def test_round_trip(data: bytes, name: str) -> None:
    assert decode_body(ENCODERS[name](data), HEADER.get(name, name), LIMIT) == data


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_large_body_round_trip(name: str) -> None:
    data = bytes(range(256)) * 2000 + b"tail"
    assert decode_body(ENCODERS[name](data), HEADER.get(name, name), LIMIT) == data


@pytest.mark.parametrize("header", ["identity", "", " , identity ,", "IDENTITY"])
def test_identity_is_the_body_itself(header: str) -> None:
    assert decode_body(b"{}", header, LIMIT) == b"{}"


def test_stacked_encodings_are_undone_in_reverse() -> None:
    data = b'{"messages": []}' * 100
    assert decode_body(zstd(gzip(data)), "gzip, zstd", LIMIT) == data
    assert decode_body(gzip(zstd(data)), "zstd,GZIP", LIMIT) == data
    assert decode_body(gzip(data), "identity, gzip", LIMIT) == data


def test_several_gzip_members_and_zstd_frames() -> None:
    assert decode_body(gzip(b"one ") + gzip(b"two"), "gzip", LIMIT) == b"one two"
    assert decode_body(zstd(b"one ") + zstd_streamed(b"two"), "zstd", LIMIT) == b"one two"


def test_empty_body_stays_empty() -> None:
    assert decode_body(b"", "gzip", LIMIT) == b""


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_limit_applies_to_the_decoded_size(name: str) -> None:
    data = b"x" * 10_000
    encoded = ENCODERS[name](data)
    assert len(encoded) < 1000
    assert decode_body(encoded, HEADER.get(name, name), len(data)) == data
    err = error(encoded, HEADER.get(name, name), len(data) - 1)
    assert err.status == 413
    assert str(len(data) - 1) in err.message


@pytest.mark.parametrize("name", ["gzip", "zstd-streamed"])
def test_bomb_stops_at_the_limit(name: str) -> None:
    # 256 MiB of zeros: decoding stops about one piece past a 64 KiB limit.
    zeros = bytes(1 << 20)
    if name == "gzip":
        c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        bomb = b"".join(c.compress(zeros) for _ in range(256)) + c.flush()
    else:
        z = zstandard.ZstdCompressor(level=1).compressobj()
        bomb = b"".join(z.compress(zeros) for _ in range(256)) + z.flush()
    assert error(bomb, HEADER.get(name, name), 64 << 10).status == 413


@pytest.mark.parametrize(
    ("raw", "encoding"),
    [
        (b"\x1f\x8b\x08\x00 not gzip", "gzip"),
        (gzip(b"hello world" * 50)[:-12], "gzip"),
        (gzip(b"hello") + b"junk", "gzip"),
        (zlib.compress(b"hello")[:-3], "deflate"),
        (zlib.compress(b"hello") + b"x", "deflate"),
        (b"\x78\x9c\xff\xff\xff", "deflate"),
        (b"plain text", "zstd"),
        (zstd(b"hello world" * 50)[:-5], "zstd"),
        (zstd(b"hello") + b"junk", "zstd"),
        (b"\x28\xb5\x2f", "zstd"),
    ],
)
def test_corrupt_truncated_or_trailing_is_400(raw: bytes, encoding: str) -> None:
    err = error(raw, encoding)
    assert err.status == 400
    assert encoding in err.message


def test_zstd_window_over_8_mib_is_refused() -> None:
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=24)
    frame = zstandard.ZstdCompressor(compression_params=params).compressobj()
    data = frame.compress(b"x" * 100) + frame.flush()
    err = error(data, "zstd")
    assert err.status == 400


@pytest.mark.parametrize("encoding", ["br", "compress", "gzip, br", "x-\udcff", "gzip, " * 4])
def test_unsupported_encoding_is_415(encoding: str) -> None:
    err = error(gzip(b"{}"), encoding)
    assert err.status == 415
    err.message.encode("utf-8")  # safe to send back: no lone surrogate from the header
