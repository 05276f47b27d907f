"""A guest's screen as ``vm screenshot`` saves it: a PNG read with the stdlib (no Pillow)."""

from __future__ import annotations

import struct
import zlib


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of a PNG as QEMU writes it (8-bit RGB, no
    interlace): the stdlib is enough."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    chunks, at = {}, 8
    idat = b""
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"IDAT":
            idat += body
        chunks.setdefault(kind, body)
        at += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour, interlace) == (8, 2, 0), (depth, colour, interlace)
    raw, stride, rows, previous = zlib.decompress(idat), width * 3, [], bytes(width * 3)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for x in range(stride):
            left = line[x - 3] if x >= 3 else 0
            up, corner = previous[x], previous[x - 3] if x >= 3 else 0
            guess = (0, left, up, (left + up) // 2, _paeth(left, up, corner))[kind]
            line[x] = (line[x] + guess) & 255
        rows.append(bytes(line))
        previous = bytes(line)
    return width, height, rows


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def lit_rows(rows: list[bytes]) -> list[int]:
    """The rows that hold anything but the background (the colour of the top-left pixel)."""
    background = rows[0][:3]
    return [y for y, row in enumerate(rows)
            if any(row[x:x + 3] != background for x in range(0, len(row), 3))]
