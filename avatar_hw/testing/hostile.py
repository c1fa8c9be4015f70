"""A hostile guest's moves, for tests, ``bench.hostile`` and ``bench.soak``: chains through
indirect tables of any size, a queue flooded with huge chains, and random scribbling of
rings, descriptors and registers (what tests/test_fuzz.py draws with hypothesis,
``bench.soak`` with ``random``).

Everything here writes only into the VM's own RAM and its own register window, as a
guest could.
"""

import contextlib
import logging
import struct

from ..virtio import constants as c

DESC = struct.Struct("<QIHH")


def table_bytes(segments):
    """An indirect table (or descriptor table) for ``segments`` [(gpa, length, writable)],
    each descriptor linked to the next."""
    out = bytearray()
    for i, (gpa, length, writable) in enumerate(segments):
        last = i == len(segments) - 1
        flags = (c.DESC_F_WRITE if writable else 0) | (0 if last else c.DESC_F_NEXT)
        out += DESC.pack(gpa, length, flags, 0 if last else i + 1)
    return bytes(out)


def indirect_chain(queue, table, segments):
    """Make one chain of ``segments`` available through an indirect table written at
    ``table`` (any number of entries; the driver's ``add_chain`` takes 16); its head."""
    queue.ram.write(table, table_bytes(segments))
    head = queue.free.pop(0)
    queue.write_desc(head, table, DESC.size * len(segments), c.DESC_F_INDIRECT)
    queue.outstanding[head] = ([head], list(segments))
    queue.make_available(head)
    return head


def flood(queue, table, segments):
    """Issue 13's worst notify: every descriptor of ``queue`` is an indirect descriptor for
    the one table of ``segments`` at ``table``, and every head is made available."""
    queue.ram.write(table, table_bytes(segments))
    for head in list(queue.free):
        queue.write_desc(head, table, DESC.size * len(segments), c.DESC_F_INDIRECT)
        queue.outstanding[head] = ([head], list(segments))
        queue.make_available(head)
    queue.free.clear()


def forget_used(queue):
    """Take back every used entry without reading data (their descriptors are free for the
    next ``flood``); their number."""
    return len(queue.get_used(read_data=False))


# -- scribbling (the fuzzers' moves) ---------------------------------------------------------------

class _InternalErrors(logging.Handler):
    BUGS = ("internal error", "not in flight")      # the second: ``Virtqueue.add_used``

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        message = record.getMessage()
        if any(bug in message for bug in self.BUGS):
            self.records.append(record)


@contextlib.contextmanager
def internal_errors():
    """The log records of device bugs, as a list filled while the ``with`` block runs (those
    the rate limit sends to debug too): errors that escaped into a catch-all, and a chain
    handed back to ``add_used`` that is not in flight."""
    watcher = _InternalErrors()
    loggers = [logging.getLogger(name) for name in ("avatar_hw.virtio.transport",
                                                    "avatar_hw.virtio.device",
                                                    "avatar_hw.virtio.queue")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(watcher)
        logger.setLevel(logging.DEBUG)
    try:
        yield watcher.records
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(watcher)
            logger.setLevel(level)


REGISTERS = sorted({v for k, v in vars(c).items() if k.startswith("REG_")})


def run_ops(bench, ops):
    """Register accesses ``(offset, is_write, size, value)`` through the trap handler; each
    must be answered, with a value of the access's size."""
    window = bench.transport.window
    for offset, is_write, size, value in ops:
        handled, result = bench.subsystem.handle_mmio_trap(window + offset, value, is_write, size)
        assert handled
        assert 0 <= result < 1 << (8 * size)
    bench.check_guards()


def random_rings(bench, indices, descs, heads, avail_idx, used_event, flags, features_drop,
                 ops):
    """Set queues ``indices`` up, fill them with 16 random descriptors ``descs``
    [(addr, length, flags, next)] (8 in the table, 8 in an indirect table the table's
    descriptor 7 points at), available ring ``heads``, a random available index, used
    event and flags; notify; then the register accesses ``ops`` between notifies."""
    drop = ((features_drop & 1) << c.F_RING_EVENT_IDX
            | (features_drop >> 1) << c.F_RING_INDIRECT_DESC)
    queues = bench.driver.init(indices, drop=drop, buf_size=256, size=8)
    for q in queues:
        for i in range(8):
            q.write_desc(i, *descs[i])
        table = q.indirect_tables
        for i in range(8, 16):
            q.write_desc(i - 8, *descs[i], table=table)
        q.write_desc(7, table, 16 * ((descs[7][3] % 9)), c.DESC_F_INDIRECT | (descs[7][2] & 1))
        for i, head in enumerate(heads):
            bench.ram.write(q.avail + 4 + 2 * i, struct.pack("<H", head))
        q.set_avail_flags(flags)
        q.set_used_event(used_event)
        q.set_avail_idx(avail_idx)
        q.notify()
    notify = [(c.REG_QUEUE_NOTIFY, True, 4, i) for i in range(6)]
    run_ops(bench, notify + ops + notify)
    for queue in bench.device.queues:
        assert not queue.ready or queue.in_flight <= queue.size


class RandomGuest:
    """The fuzzers' draws with ``random.Random``: ``rings(bench, ram_base, ram_size)`` and
    ``ops(ram_base, ram_size)`` give arguments for ``random_rings`` / ``run_ops``."""

    def __init__(self, rng):
        self.rng = rng

    def value(self, base, size):
        r = self.rng
        pick = r.randrange(3)
        if pick == 0:
            return r.getrandbits(32)
        if pick == 1:
            return r.choice([0, 1, 2, 3, 4, 8, 0x0F, 0x40, 0xFF])
        return r.randint(base - 64, base + size + 64)

    def ops(self, base, size, count=None):
        r = self.rng
        out = []
        for _ in range(r.randrange(81) if count is None else count):
            offset = r.choice([r.choice(REGISTERS), r.randrange(0x200),
                               c.REG_CONFIG + r.randrange(16)])
            out.append((offset, r.random() < 0.5, r.choice([4, 4, 4, 1, 2, 8]),
                        self.value(base, size)))
        return out

    def descriptor(self, base, size):
        r = self.rng
        if r.randrange(4):                 # mostly plausible, so chains get deep
            return (r.randint(base, base + size - 256), r.randint(0, 256), r.randrange(8),
                    r.randrange(10))
        addr = r.choice([r.randint(base, base + size), r.getrandbits(64),
                         r.randint(base + size - 32, base + size + 32)])
        length = r.choice([r.randint(0, 256), r.getrandbits(32)])
        return addr, length, r.randrange(8), r.randrange(21)

    def contents(self, base, size, descs):
        """``[(gpa, bytes)]``: what the guest writes into the buffers of ``descs`` (those
        inside its RAM) so that devices parse requests, not zeros: a first 32-bit word that
        is often a plausible type, size or command (small, or a GPU command), then random
        bytes, often small values."""
        r = self.rng
        out = []
        for addr, length, _, _ in descs:
            n = min(length, 512, base + size - addr)
            if addr < base or n <= 0:
                continue
            first = r.choice([r.randrange(16), r.randrange(0x400), r.randrange(0x100, 0x10B),
                              0x300, 0x301, n, r.getrandbits(32)])
            tail = (r.randbytes(n) if r.random() < 0.5
                    else bytes(r.choice((0, 0, 1, 2, 3, 0xFF)) for _ in range(n)))
            out.append((addr, (first.to_bytes(4, "little") + tail)[:n]))
        return out

    def rings(self, base, size):
        """Keyword arguments of ``random_rings`` but ``bench`` and ``indices``."""
        r = self.rng
        return {"descs": [self.descriptor(base, size) for _ in range(16)],
                "heads": [r.choice([r.randrange(8), r.randrange(21)]) for _ in range(8)],
                "avail_idx": r.choice([r.randrange(10), r.randrange(0x10000)]),
                "used_event": r.randrange(0x10000), "flags": r.randrange(2),
                "features_drop": r.randrange(4), "ops": self.ops(base, size)}
