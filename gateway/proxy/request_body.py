"""Decoding of compressed request bodies (``Content-Encoding``), bounded by the decoded size.

Pure: bytes in, bytes or a :class:`BodyError` out. The gateway decodes what clients compress
(Codex sends zstd, some SDKs gzip) and forwards the decoded body without ``Content-Encoding``:
a provider need not accept the client's encoding, and the gateway must read the body anyway.
The size limit applies to the decoded body, and no more than about one piece past it is ever
held, so a small "bomb" (a few KiB that expand to GiBs) costs no memory.
"""

from __future__ import annotations

import zlib

import zstandard

__all__ = ["BodyError", "decode_body"]

# Output produced per decompressor call (zlib's max_length).
_PIECE = 64 * 1024
# RFC 8878 3.1.1.1.2: HTTP decoders need not support zstd windows above 8 MiB, and encoders must
# not require more; a larger one would also let a tiny frame reserve that much memory.
_ZSTD_MAX_WINDOW = 8 * 1024 * 1024
# zstd expands at most ~32 KiB per input byte (an RLE block: 4 bytes for 128 KiB), and its
# decompressor has no output cap: it is fed slices small enough to stay within the budget.
_ZSTD_MAX_RATIO = 32 * 1024
_ZSTD_MIN_STEP = 16
# Stacked encodings ("gzip, zstd") are decoded in reverse; more than this is no real client.
_MAX_LAYERS = 3


class BodyError(Exception):
    """A body the gateway refuses: answer ``status`` with ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_body(raw: bytes, content_encoding: str, limit: int) -> bytes:
    """``raw`` decoded as ``content_encoding`` says, at most ``limit`` bytes.

    Supports ``gzip`` (``x-gzip``; several members), ``deflate`` (zlib-wrapped, or raw as some
    clients send it), ``zstd`` (several frames) and ``identity``, stacked in the order they were
    applied. Raises :class:`BodyError`: 415 for an encoding it does not support, 400 for a body
    that is not valid in its encoding (corrupt, truncated, trailing bytes), 413 past ``limit``.
    An empty body stays empty.
    """
    codings = [c for c in (t.strip().lower() for t in content_encoding.split(",")) if c]
    layers = [c for c in codings if c != "identity"]
    for coding in layers:
        if coding not in _DECODERS:
            raise BodyError(
                415,
                f"unsupported Content-Encoding {coding[:40]!r}: "
                "the gateway accepts gzip, deflate, zstd or identity",
            )
    if len(layers) > _MAX_LAYERS:
        raise BodyError(415, f"more than {_MAX_LAYERS} stacked Content-Encodings")
    body = raw
    for coding in reversed(layers):
        if not body:
            break
        body = _DECODERS[coding](body, limit)
    return body


def _too_large(limit: int) -> BodyError:
    return BodyError(413, f"request body exceeds the gateway limit of {limit} bytes once decoded")


def _corrupt(coding: str, why: str) -> BodyError:
    return BodyError(400, f"request body is not valid {coding} (Content-Encoding): {why}")


def _gunzip(data: bytes, limit: int) -> bytes:
    # A gzip body may hold several members, one after another (as gzip.decompress accepts).
    return _inflate(data, limit, 16 + zlib.MAX_WBITS, "gzip", members=True)


def _deflate(data: bytes, limit: int) -> bytes:
    # HTTP's "deflate" is the zlib format (RFC 9110 8.4.1.2), but some clients send raw deflate.
    zlib_wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
    wbits = zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS
    return _inflate(data, limit, wbits, "deflate", members=False)


def _inflate(data: bytes, limit: int, wbits: int, coding: str, *, members: bool) -> bytes:
    out: list[bytes] = []
    size = 0
    try:
        while True:
            inflater = zlib.decompressobj(wbits)
            while not inflater.eof:
                piece = inflater.decompress(data, _PIECE)
                data = inflater.unconsumed_tail
                if not piece and not data and not inflater.eof:
                    raise _corrupt(coding, "truncated")
                size += len(piece)
                if size > limit:
                    raise _too_large(limit)
                out.append(piece)
            data = inflater.unused_data
            if not data or not members:
                break
    except zlib.error as exc:
        raise _corrupt(coding, str(exc)) from None
    if data:
        raise _corrupt(coding, "bytes after the end of the compressed data")
    return b"".join(out)


def _unzstd(data: bytes, limit: int) -> bytes:
    out: list[bytes] = []
    size = 0
    decompressor = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    try:
        while data:
            # One object per frame (concatenated frames are one valid body): its eof marks the
            # frame's end, so a truncated frame is told apart from a complete one.
            frame = decompressor.decompressobj(write_size=_PIECE)
            view = memoryview(data)
            pos = 0
            while not frame.eof:
                if pos >= len(view):
                    raise _corrupt("zstd", "truncated")
                step = max(_ZSTD_MIN_STEP, (limit - size) // _ZSTD_MAX_RATIO)
                piece = frame.decompress(view[pos : pos + step])
                pos += step
                size += len(piece)
                if size > limit:
                    raise _too_large(limit)
                out.append(piece)
            data = bytes(frame.unused_data) + bytes(view[pos:])
    except zstandard.ZstdError as exc:
        raise _corrupt("zstd", str(exc)) from None
    return b"".join(out)


_DECODERS = {"gzip": _gunzip, "x-gzip": _gunzip, "deflate": _deflate, "zstd": _unzstd}
