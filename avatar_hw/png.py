"""PNG files of RGB images with the standard library (zlib + struct), for screenshots.

``encode(width, height, rows)``: 8-bit truecolour, no interlace, every row with
filter 0 (none), compressed at zlib level 6 as the rows come (zlib lets other
threads run while it compresses): a terminal's screen shrinks to a few KiB, a
1024x768 one takes some tens of milliseconds.
"""

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTER_NONE = b"\0"


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode(width, height, rows):
    """The PNG file of ``rows`` (``height`` rows of ``width * 3`` RGB bytes, top to bottom)."""
    if not width or not height:
        raise ValueError(f"a {width}x{height} image has no pixels")
    compressor, data, count = zlib.compressobj(6), [], 0
    for row in rows:
        if len(row) != width * 3:
            raise ValueError(f"a row of {len(row)} bytes in a {width}-pixel-wide RGB image")
        data += compressor.compress(FILTER_NONE), compressor.compress(row)
        count += 1
    if count != height:
        raise ValueError(f"{count} rows in a {width}x{height} image")
    data.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(data))
            + _chunk(b"IEND", b""))
