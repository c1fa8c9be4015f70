"""Register shadow pages (``AVT_F_REGISTER_SHADOW``, docs/trap-abi.md section 14).

The model keeps, for each device window, a page with the current value of the
registers only it changes — identity, DeviceFeatures and the queue registers
for the current selectors, InterruptStatus, Status, ConfigGeneration and the
configuration space — so that the stub answers reads of them at EL2 with no
round trip. Each page is a seqlock the model alone writes: ``seq`` odd, a full
fence, the image and the valid bits, then ``seq`` even with a store-release;
the stub answers a read only if it read the same even ``seq`` before
(load-acquire) and after (``DMB ISHLD``) the value, and traps otherwise.

``StubShadowReader`` is the stub's side in Python, for the stand-in stub.
"""

import ctypes

from . import abi
from .hw import ordering

_WORDS = abi.SHADOW_IMAGE_SIZE // 4
_CONFIG = 0x100                      # the configuration space's window offset
_MAX_CONFIG = abi.SHADOW_IMAGE_SIZE - _CONFIG


def _valid_words(registers, config_size):
    """The valid bitmap (``SHADOW_VALID_WORDS`` ints) for ``registers`` (window offsets of
    32-bit registers) and the first ``config_size`` bytes of the configuration space:
    only whole words, since a read past the configuration's end reads 0 in the transport."""
    bits = [0] * abi.SHADOW_VALID_WORDS
    words = [offset // 4 for offset in registers]
    words += range(_CONFIG // 4, (_CONFIG + min(config_size, _MAX_CONFIG)) // 4)
    for word in words:
        bits[word // 32] |= 1 << word % 32
    return tuple(bits)


class RegisterShadows:
    """The shadow pages at ``offset`` of ``region`` (the trap page's mapping), one per
    window number below ``count``."""

    def __init__(self, region, offset, count):
        self.region, self.count = region, count
        views = [region.view(offset + n * abi.SHADOW_PAGE_SIZE, abi.SHADOW_PAGE_SIZE)
                 for n in range(count)]
        self.pages = tuple(abi.Shadow.from_buffer(view) for view in views)
        self._images = tuple(view[:abi.SHADOW_IMAGE_SIZE] for view in views)
        self._words = tuple((ctypes.c_uint32 * _WORDS).from_buffer(view) for view in views)
        base = region.address + offset + abi.SHADOW_SEQ_OFFSET
        self._seq_addrs = tuple(base + n * abi.SHADOW_PAGE_SIZE for n in range(count))
        self._valid = [None] * count        # window -> the valid bitmap its transport needs

    def clear(self, window=None):
        """Nothing valid in ``window`` (None: every page): the stub traps every read."""
        for n in range(self.count) if window is None else (window,):
            if n < self.count:
                self._valid[n] = None
                self._write(n, None, (0,) * abi.SHADOW_VALID_WORDS)

    def publish(self, window, transport):
        """Make ``window``'s page show ``transport``'s registers as they are now."""
        if window >= self.count:
            return
        valid = self._valid[window]
        if valid is None:
            valid = self._valid[window] = _valid_words(transport.shadowed_registers,
                                                       len(transport.device.config))
        self._write(window, transport, valid)

    def _write(self, window, transport, valid):
        page = self.pages[window]
        seq = page.seq
        page.seq = seq if seq & 1 else seq + 1             # odd: the stub traps meanwhile
        ordering.fence()                                   # seq before the image (DMB ISH)
        if transport is not None:
            words = self._words[window]
            for offset in transport.shadowed_registers:
                words[offset // 4] = transport.read(offset, 4)
            config = transport.device.config[:_MAX_CONFIG]
            self._images[window][_CONFIG:_CONFIG + len(config)] = config
        page.valid[:] = valid
        ordering.store_release32(self._seq_addrs[window], (page.seq + 1) & 0xFFFFFFFF)

    def hits(self, window):
        """Reads the stub answered from ``window``'s page (its own counter)."""
        return self.pages[window].hits if window < self.count else 0


class StubShadowReader:
    """The stub's read of a shadow page (boards/emulated/trap.c does the same in C)."""

    def __init__(self, region, offset, count):
        self.region, self.offset, self.count = region, offset, count
        self.pages = tuple(
            abi.Shadow.from_buffer(region.view(offset + n * abi.SHADOW_PAGE_SIZE,
                                               abi.SHADOW_PAGE_SIZE))
            for n in range(count))

    def read(self, window, offset, size):
        """The value for a ``size``-byte read at ``offset`` of ``window``, or None: trap."""
        if window >= self.count or offset >= abi.SHADOW_IMAGE_SIZE or offset % size:
            return None
        if size != 4 and (offset < _CONFIG or size not in (1, 2)):
            return None
        seq_offset = self.offset + window * abi.SHADOW_PAGE_SIZE + abi.SHADOW_SEQ_OFFSET
        page = self.pages[window]
        seq = self.region.load_acquire32(seq_offset)
        word = offset // 4
        if seq & 1 or not page.valid[word // 32] >> word % 32 & 1:
            return None
        value = int.from_bytes(bytes(page.image[offset:offset + size]), "little")
        ordering.fence()                                   # DMB ISHLD
        if self.region.load_acquire32(seq_offset) != seq:
            return None
        page.hits += 1
        return value
