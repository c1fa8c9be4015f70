"""Sizes as people write them: bytes, or a number with K, M, G or T."""

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(size):
    """Bytes from ``size``: an int, or text such as ``4096``, ``384M``, ``1G``, ``512MiB``
    (K, M, G, T: powers of 1024); ``ValueError`` naming the accepted forms."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(size), re.I | re.ASCII)
    if not match:
        raise ValueError(f"size {size!r}: give bytes, or a number with K, M, G or T "
                         "(e.g. 384M)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]
