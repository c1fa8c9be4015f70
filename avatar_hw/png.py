"""PNG files of RGB images with the standard library (zlib + struct), for screenshots.

``encode(width, height, rgb)``: 8-bit truecolour, no interlace, every row with
filter 0 (none), compressed at zlib level 6: a terminal's screen shrinks to
a few KiB, a 1024x768 one takes some tens of milliseconds.
"""

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode(width, height, rgb):
    """The PNG file of ``rgb`` (``width * height * 3`` bytes, rows top to bottom)."""
    row = width * 3
    if len(rgb) != row * height or not width or not height:
        raise ValueError(f"{len(rgb)} bytes is not a {width}x{height} RGB image")
    raw = bytearray((row + 1) * height)         # each row: filter byte 0, then the pixels
    source = memoryview(rgb)
    for y in range(height):
        raw[y * (row + 1) + 1:(y + 1) * (row + 1)] = source[y * row:(y + 1) * row]
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))
