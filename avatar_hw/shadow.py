"""Register shadow pages (``AVT_F_REGISTER_SHADOW``, docs/trap-abi.md section 14).

The model keeps, for each device window, a page with the current value of the
registers only it changes — identity, DeviceFeatures and the queue registers
for the current selectors, InterruptStatus, Status, ConfigGeneration and the
configuration space — so that the stub answers reads of them at EL2 with no
round trip. Each page is a seqlock the model alone writes: ``seq`` odd, a full
fence, the image and the valid bits, then ``seq`` even with a store-release;
the stub answers a read only if it read the same even ``seq`` before
(load-acquire) and after (``DMB ISHLD``) the value, and traps otherwise.

With ``AVT_F_STUB_ACK`` (ABI 1.2) the stub also takes the guest's InterruptACK
writes itself: it counts them per InterruptStatus bit in the page's ``acks``
(its own words, atomic adds), and answers InterruptStatus with the bits
acknowledged since the image was written (``acks`` != ``acks_seen``) cleared.
The model applies the counts it has not seen (``take_acks``) before it sets an
InterruptStatus bit and before it answers a trapped InterruptStatus read, and
writes the counts its image reflects into ``acks_seen`` with the image.

``StubShadowReader`` is the stub's side in Python, for the stand-in stub.
"""

import ctypes

from . import abi
from .hw import ordering

_WORDS = abi.SHADOW_PAGE_SIZE // 4       # a page's 32-bit words: the image's, then seq's
_CONFIG = 0x100                      # the configuration space's window offset
_INTERRUPT_STATUS = 0x060
_ACK_BITS = 2                        # InterruptStatus bits: used buffer, configuration change
_MAX_CONFIG = abi.SHADOW_IMAGE_SIZE - _CONFIG


def _is_valid(page, offset):
    """Whether the 32-bit image word holding window ``offset`` is current in ``page``."""
    word = offset // 4
    return bool(page.valid[word // 32] >> word % 32 & 1)


def _valid_words(registers, config_size):
    """The valid bitmap (``SHADOW_VALID_WORDS`` ints) for ``registers`` (window offsets of
    32-bit registers) and the first ``config_size`` bytes of the configuration space:
    only whole words: the bytes past the configuration's end read all ones, in the
    transport's pieces (``transport.pieces``), which the image does not hold."""
    bits = [0] * abi.SHADOW_VALID_WORDS
    words = [offset // 4 for offset in registers]
    words += range(_CONFIG // 4, (_CONFIG + min(config_size, _MAX_CONFIG)) // 4)
    for word in words:
        bits[word // 32] |= 1 << word % 32
    return tuple(bits)


class RegisterShadows:
    """The shadow pages at ``offset`` of ``region`` (the trap page's mapping), one per
    window number below ``count``."""

    def __init__(self, region, offset, count, *, stub_ack=False):
        self.region, self.count = region, count
        self.stub_ack = stub_ack            # AVT_F_STUB_ACK is in force
        views = [region.view(offset + n * abi.SHADOW_PAGE_SIZE, abi.SHADOW_PAGE_SIZE)
                 for n in range(count)]
        self.pages = tuple(abi.Shadow.from_buffer(view) for view in views)
        self._acks = tuple(page.acks for page in self.pages)
        self._acks_seen = [[0] * _ACK_BITS for _ in range(count)]   # the counts applied
        self._images = tuple(view[:abi.SHADOW_IMAGE_SIZE] for view in views)
        self._words = tuple((ctypes.c_uint32 * _WORDS).from_buffer(view) for view in views)
        base = region.address + offset + abi.SHADOW_SEQ_OFFSET
        self._store_seqs = tuple(   # each page's seq, written with a store-release
            ordering.release_writer32(words, abi.SHADOW_SEQ_OFFSET // 4,
                                      base + n * abi.SHADOW_PAGE_SIZE)
            for n, words in enumerate(self._words))
        self._valid = [None] * count        # window -> the valid bitmap its transport needs

    def clear(self, window=None):
        """Nothing valid in ``window`` (None: every page): the stub traps every read."""
        for n in range(self.count) if window is None else (window,):
            if n < self.count:
                self._valid[n] = None
                # Acknowledgements nobody applied (a previous model's, a removed device's)
                # are dropped: at worst a bit the guest acknowledged stays set, never a bit
                # is lost (docs/trap-abi.md section 15).
                self._acks_seen[n][:] = self._acks[n]
                self._write(n, None, (0,) * abi.SHADOW_VALID_WORDS)

    def take_acks(self, window):
        """The InterruptStatus bits the stub acknowledged for ``window`` since the last call
        (``AVT_F_STUB_ACK``), for the caller to clear; 0 when none."""
        if not self.stub_ack or window >= self.count:
            return 0
        acks, seen = self._acks[window], self._acks_seen[window]
        bits = 0
        for bit in range(_ACK_BITS):
            count = acks[bit]
            if count != seen[bit]:
                seen[bit] = count
                bits |= 1 << bit
        if bits:
            ordering.acquire_fence()    # the counts before what the caller does with them
        return bits

    def publish(self, window, transport):
        """Make ``window``'s page show ``transport``'s registers as they are now."""
        if window >= self.count:
            return
        valid = self._valid[window]
        if valid is None:
            valid = self._valid[window] = _valid_words(transport.shadowed_registers,
                                                       len(transport.device.config))
        self._write(window, transport, valid)

    def publish_interrupt_status(self, window, value):
        """Make ``window``'s page show InterruptStatus ``value``, the one register an
        interrupt changes (a whole ``publish`` costs ~10x more); nothing if the page was
        never published (no word of it is valid)."""
        if window >= self.count or self._valid[window] is None:
            return
        page = self._begin(window)
        self._words[window][_INTERRUPT_STATUS // 4] = value
        self._end(window, page)

    def _begin(self, window):
        """Open ``window``'s seqlock section; its page."""
        page = self.pages[window]
        seq = page.seq
        page.seq = seq if seq & 1 else seq + 1             # odd: the stub traps meanwhile
        ordering.fence()                                   # seq before the image (DMB ISH)
        return page

    def _end(self, window, page):
        """Close the section: the acknowledgement counts the image reflects, then ``seq``
        even with a store-release (the image before it)."""
        page.acks_seen[:] = self._acks_seen[window]
        self._store_seqs[window]((page.seq + 1) & 0xFFFFFFFF)

    def _write(self, window, transport, valid):
        page = self._begin(window)
        if transport is not None:
            words = self._words[window]
            for offset in transport.shadowed_registers:
                words[offset // 4] = transport.read(offset, 4)
            config = transport.device.config[:_MAX_CONFIG]
            self._images[window][_CONFIG:_CONFIG + len(config)] = config
        page.valid[:] = valid
        self._end(window, page)

    def acks_taken(self, window):
        """InterruptACK writes the stub took for ``window`` (per bit, wrapping counters)."""
        return sum(self._acks[window]) if window < self.count else 0

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

    def read(self, window, offset, size, *, stub_ack=False):
        """The value for a ``size``-byte read at ``offset`` of ``window``, or None: trap.
        ``stub_ack``: ``AVT_F_STUB_ACK`` is in force (InterruptStatus less the bits
        acknowledged since the image was written)."""
        if window >= self.count or offset >= abi.SHADOW_IMAGE_SIZE or offset % size:
            return None
        if size != 4 and (offset < _CONFIG or size not in (1, 2)):
            return None
        seq_offset = self.offset + window * abi.SHADOW_PAGE_SIZE + abi.SHADOW_SEQ_OFFSET
        page = self.pages[window]
        seq = self.region.load_acquire32(seq_offset)
        if seq & 1 or not _is_valid(page, offset):
            return None
        value = int.from_bytes(bytes(page.image[offset:offset + size]), "little")
        if stub_ack and offset == _INTERRUPT_STATUS:
            for bit in range(_ACK_BITS):
                if page.acks[bit] != page.acks_seen[bit]:
                    value &= ~(1 << bit)
        ordering.fence()                  # DMB ISH (the stub's DMB ISHLD, stronger)
        if self.region.load_acquire32(seq_offset) != seq:
            return None
        page.hits += 1
        return value

    def take_ack(self, window, value):
        """The stub's InterruptACK write of ``value`` to ``window`` (``AVT_F_STUB_ACK``):
        True if taken here (counted in ``acks``), False: post it to the model. Taken only
        while the page's InterruptStatus word is valid (a model publishes the window)."""
        if window >= self.count or not _is_valid(self.pages[window], _INTERRUPT_STATUS):
            return False
        base = (self.region.address + self.offset + window * abi.SHADOW_PAGE_SIZE
                + abi.SHADOW_ACKS_OFFSET)
        for bit in range(_ACK_BITS):
            if value >> bit & 1:
                ordering.fetch_add32(base + 4 * bit, 1)
        ordering.fence()                                   # DMB ISH: before the guest goes on
        return True
