"""Split virtqueues (VirtIO 1.2 section 2.7) over guest memory.

A ``Virtqueue`` holds the state the transport programs (size, ready, ring
addresses) and the device's progress (``last_avail_idx``, ``used_idx``).
``set_up`` validates the layout once and makes the views of the three rings
the hot path uses (no per-buffer lookups or allocations beyond the chain
itself). ``pop`` is the one descriptor-chain iterator: every guest value is
checked there (the descriptors by the walk of ``avatar_hw.virtio.chain``), and
only there.

What a bad guest gets (the two outcomes of the spec's "device MAY ... or set
DEVICE_NEEDS_RESET"):

* **bad chain -> used entry with length 0** (the head is valid, so the guest
  gets it back and does not stall: ``on_used(queue)`` is called so the
  device interrupts for it like for its own used buffers; a rate-limited
  warning is logged, ``bad_chains`` counts it): every rule the chain walk
  checks (``avatar_hw.virtio.chain``: bad indices, loops, buffers outside RAM,
  indirect tables, order, length).
* **ring corruption -> DEVICE_NEEDS_RESET** (nothing in the used ring can
  be trusted to answer it; ``on_error`` is called, the queue stops): the
  available index ahead of ``last_avail_idx`` by more than the queue size;
  a head index >= the queue size; a head that is already in flight (offered
  twice: processing it again would complete it twice).
* ``set_up`` refuses (``QueueError``) a size that is not a power of two in
  1..``max_size``, misaligned rings (16/2/4) or rings not inside RAM.

Empty descriptors are valid and skipped: a chain's views are its non-empty
buffers only, so no I/O vector is ever built of nothing.

**Turns.** A guest can offer a queue's worth of chains of a queue's worth of
descriptors at every notify. ``pop`` therefore works in turns: each turn
(``new_turn``: the transport starts one at every notify, the device's resume
another) may take a queue's worth of chains, walk ``TURN_DESCRIPTORS``
descriptors and ``TURN_BYTES`` bytes of chains, plus the work a device
``charge``s (the chain that crosses a limit is still returned). Past that,
``pop`` answers None and calls ``on_yield(queue)``: the device resumes the
queue on the event loop's next turn, after every other VM's and device's
pending work (see ``VirtioDevice``), so one notify holds the daemon for a
bounded time and no guest starves another.

Devices hold ``DescriptorChain`` objects while they work and hand each back with
``add_used(chain, length)``. **Generations.** A chain carries its queue's ``generation``,
which every reset, ``set_up`` and ``disable`` replaces with a number no queue had before
(one counter for all): ``add_used`` refuses a chain of another generation (ignored,
counted in ``refused``, logged once and then rate-limited), so a chain a device held
across a device reset, a QueueReset or QueueReady = 0 (or a chain of another queue) can
never complete the new chain that has its head, nor index a ring set up smaller. A
device still drops held chains in its reset hooks: their buffers are the guest's again.

**Progress kept outside the process** (``avatar_hw.state``, a restart under a running
guest). ``keep_progress(indices, in_flight)`` puts ``last_avail_idx``, the used word and
the in-flight table in the state file's mapping; each is one store where the queue
changes it. ``_in_flight[head]`` is the chain's available-ring position + 1 (0: not in
flight), so the order in which chains were popped survives. The used word is the used
idx; inside ``add_used``, ``USED_KEPT | head << 16 | the used idx it publishes``. Stores
are ordered so that a process killed between any two of them leaves a state ``restore``
can finish: ``pop`` marks the head before it moves ``last_avail_idx``; ``add_used``
stores the used word naming its head, publishes the used idx in guest RAM, clears the
head, stores the plain used word. ``restore`` reconciles them and hands the chains that
were in flight back through ``pop`` first, in pop order, so the device does each again
(it completed none: its used entry was not published). Of the guest's rings it trusts
only the used idx, and that only as one of the values the used word allows.
"""

import collections
import itertools
import logging

from ..hw import ordering
from ..layout import address
from ..ratelimit import RateLimitedLog
from .chain import DescriptorChain, DescriptorTable
from .constants import (AVAIL_ALIGN, AVAIL_F_NO_INTERRUPT, DESC_ALIGN, DESC_SIZE,
                        F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, MAX_QUEUE_SIZE, USED_ALIGN,
                        USED_F_NO_NOTIFY)

log = logging.getLogger(__name__)

TURN_DESCRIPTORS = 1024           # descriptors walked per queue per turn
TURN_BYTES = 8 << 20              # bytes of chains popped per queue per turn
USED_KEPT = 1 << 31               # the used word names a head (see "Progress kept ...")
_CUT_SHORT = 0xFFFF               # a mark's age when its pop did not move last_avail_idx

_generations = itertools.count(1)   # every queue's generations (see "Generations")


class QueueError(Exception):
    """The driver programmed a queue layout the device cannot use."""


class Virtqueue:
    """A split virtqueue of at most ``max_size`` entries.

    ``on_error(reason)`` is called once when the driver corrupts the rings
    beyond repair (the device then sets DEVICE_NEEDS_RESET and logs it);
    ``on_used(queue)`` when ``pop`` completed bad chains (the device signals
    them); ``on_yield(queue)`` when ``pop`` stopped because the turn's budget
    is spent (the device resumes it later).
    """

    def __init__(self, index, max_size, *, on_error=None, on_used=None, on_yield=None):
        if max_size < 1 or max_size & (max_size - 1) or max_size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue {index}: maximum size {max_size} is not a power of two "
                             f"in 1..{MAX_QUEUE_SIZE}")
        self.index = index
        self.max_size = max_size
        # Popped by another process (a vhost-user back-end), never by ``pop``: then
        # ``last_avail_idx`` says nothing of the driver's progress (``notified``).
        self.served_elsewhere = False
        self.on_error = on_error
        self.on_used = on_used
        self.on_yield = on_yield
        self._bad_chain_log = RateLimitedLog(log)
        self._restore_log = RateLimitedLog(log)
        self._break_log = RateLimitedLog(log, level=logging.ERROR)
        self._refused_log = RateLimitedLog(log, first=1, level=logging.ERROR)
        self._indices = [0, 0]                       # last_avail_idx, the used word
        self._in_flight_store = [0] * max_size       # see "Progress kept outside the process"
        self._replay = collections.deque()           # heads restored in flight, pop order
        self.reset()

    def keep_progress(self, indices, in_flight):
        """Keep ``last_avail_idx``/``used_idx`` in ``indices`` and the in-flight table in
        ``in_flight`` (``max_size`` entries) from now on: 32-bit memoryviews of the state
        file (``avatar_hw.state``). A ready queue copies its progress there first and
        goes on in the new stores."""
        if self.ready:
            indices[0], indices[1] = self.last_avail_idx, self.used_idx
            for head, mark in enumerate(self._in_flight):
                in_flight[head] = mark
            self._in_flight = in_flight[:self.size]
        self._indices, self._in_flight_store = indices, in_flight

    @property
    def bad_chains(self):
        """Bad chains completed with length 0 since the queue was made."""
        return self._bad_chain_log.count

    @property
    def refused(self):
        """Chains ``add_used`` refused (stale or not in flight) since the queue was made."""
        return self._refused_log.count

    @property
    def log_lines_suppressed(self):
        """Lines about this queue's bad chains, breaks and refused chains the rate limit
        sent to debug."""
        return (self._bad_chain_log.suppressed + self._break_log.suppressed
                + self._refused_log.suppressed + self._restore_log.suppressed)

    # -- state --------------------------------------------------------------------

    def reset(self):
        """Back to the state after a device reset (not ready, nothing in flight, a new
        generation)."""
        self.size = self.max_size
        self.ready = False
        self.generation = next(_generations)
        self.desc_addr = self.driver_addr = self.device_addr = 0
        self.last_avail_idx = self._avail_idx = self._notified_idx = 0
        self.used_idx = 0
        self.event_idx = False
        self.indirect = False
        self.broken = False
        self.memory = None
        self._signalled_used = 0
        self._in_flight = None
        self._clear_progress()
        self._table = None
        self._avail = self._used_h = self._used_ring = None
        self._load_avail_idx = self._load_used_idx = self._store_used_idx = None
        self.new_turn()

    def notified(self):
        """The driver notified this ready queue: a new turn (``new_turn``). False when it
        made no entry available since its previous notify (or since ``set_up``), an *idle*
        notify (``MmioTransport``, "Idle traps"), or when its available index is more than
        a queue's worth ahead of ``last_avail_idx`` (no driver does that; a receive queue
        with nothing to receive would not see it; a queue ``served_elsewhere`` is never
        popped here, so only its repeats are idle). One plain
        load of the available index: only its value is compared, ``pop`` orders the
        entries it reads itself."""
        self.new_turn()
        idx = self._avail[1]
        if idx == self._notified_idx or (
                (idx - self.last_avail_idx) & 0xFFFF > self.size and not self.served_elsewhere):
            return False
        self._notified_idx = idx
        return True

    def new_turn(self):
        """A fresh work budget for ``pop`` (see the module docstring)."""
        self._turn_chains = self.size
        self._turn_descriptors, self._turn_bytes = TURN_DESCRIPTORS, TURN_BYTES
        self.yielded = False

    def use_features(self, features):
        """Take the ring features (EVENT_IDX, INDIRECT_DESC) from the driver's ``features``."""
        self.event_idx = bool(features >> F_RING_EVENT_IDX & 1)
        self.indirect = bool(features >> F_RING_INDIRECT_DESC & 1)

    def set_up(self, memory):
        """Validate the programmed layout against ``memory`` and make the queue ready
        (with the ring features of the last ``use_features``).

        Raises ``QueueError`` (naming the rule) and leaves the queue not ready
        when the layout is unusable.
        """
        size = self.size
        if size < 1 or size & (size - 1) or size > self.max_size:
            raise QueueError(f"queue {self.index}: size {size} is not a power of two "
                             f"in 1..{self.max_size}")
        rings = (("descriptor table", self.desc_addr, DESC_ALIGN, DESC_SIZE * size),
                 ("available ring", self.driver_addr, AVAIL_ALIGN, 6 + 2 * size),
                 ("used ring", self.device_addr, USED_ALIGN, 6 + 8 * size))
        for name, addr, align, length in rings:
            if addr % align:
                raise QueueError(f"queue {self.index}: {name} at 0x{addr:x} is not "
                                 f"{align}-byte aligned")
            if not memory.contains(addr, length):
                raise QueueError(f"queue {self.index}: {name} 0x{addr:x}+0x{length:x} is "
                                 f"outside the VM's RAM")
        self.generation = next(_generations)
        self._table = DescriptorTable(memory, self.desc_addr, size, self.generation)
        self._avail = memory.view(self.driver_addr, 6 + 2 * size).cast("H")
        self._used_h = memory.view(self.device_addr, 6 + 8 * size).cast("H")
        self._used_ring = memory.view(self.device_addr + 4, 8 * size).cast("I")
        # The two indices' ordered accesses (load-acquire, store-release), bound once.
        avail_idx = memory.address(self.driver_addr + 2, 2)
        used_idx = memory.address(self.device_addr + 2, 2)
        self._load_avail_idx = ordering.acquire_reader16(self._avail, 1, avail_idx)
        self._load_used_idx = ordering.acquire_reader16(self._used_h, 1, used_idx)
        self._store_used_idx = ordering.release_writer16(self._used_h, 1, used_idx)
        self.memory = memory
        self.last_avail_idx = self.used_idx = self._signalled_used = self._avail_idx = 0
        self._notified_idx = 0
        self._clear_progress()
        self._in_flight = self._in_flight_store[:size]
        self.broken = False
        self.ready = True

    def disable(self):
        """QueueReady = 0: not ready; the chains in flight are stale (a new generation)."""
        self.ready = False
        self.generation = next(_generations)

    def _clear_progress(self):
        self._indices[0] = self._indices[1] = 0
        store = self._in_flight_store
        for head in range(len(store)):
            store[head] = 0
        self._replay.clear()

    @property
    def in_flight(self):
        """Number of chains popped and not yet returned."""
        return 0 if self._in_flight is None else sum(map(bool, self._in_flight))

    def restore(self, memory, last_avail_idx, used, in_flight):
        """Ready again after a restart, with the kept progress (``keep_progress``:
        ``last_avail_idx``, the ``used`` word and ``in_flight``, the kept in-flight
        table): ``set_up``, then the indices and the chains in flight.

        In flight: the heads marked, each at its own position, however long ago (a 9p read
        may stay blocked while many queues' worth of requests go by), except one marked
        at the position ``last_avail_idx`` had not reached yet: a pop cut short. The
        guest's used idx must be the kept one or, when ``used`` names a head (the process
        died inside ``add_used``), the one before it: then that ``add_used`` did not
        publish, and its chain is still in flight; otherwise it did, and the chain is
        done. Any other used idx (the guest rewrote it) or a table that makes no sense
        raises ``QueueError`` (the device then needs a reset). The used entry published
        is checked against the head; another (the guest rewrote it) is logged,
        rate-limited, and changes nothing. Returns the heads handed back through ``pop``
        first.
        """
        marks = list(in_flight[:self.size])
        self.set_up(memory)
        size, last_avail_idx = self.size, last_avail_idx & 0xFFFF
        ages = {head: (last_avail_idx - mark) & 0xFFFF for head, mark in enumerate(marks)
                if mark and (last_avail_idx - mark) & 0xFFFF != _CUT_SHORT}  # 0: popped last
        used_idx, completing = used & 0xFFFF, used >> 16 & 0x7FFF if used & USED_KEPT else None
        guest_used = self._load_used_idx()
        problem = None
        if max(marks, default=0) > 0x10000 or len(set(ages.values())) != len(ages):
            problem = "the kept in-flight table has a position twice or out of range"
        elif completing is not None and guest_used == (used_idx - 1) & 0xFFFF:
            used_idx = guest_used               # died before publishing: still in flight
        elif guest_used != used_idx:
            problem = (f"the guest's used index is {guest_used}, not {used_idx}: the guest "
                       "rewrote it, or is not the one this state was kept for")
        elif completing is not None:
            ages.pop(completing, None)          # published: done
            entry = self._used_ring[2 * ((used_idx - 1) & (size - 1))]
            if entry != completing:
                self._restore_log("vm%s queue %d: the guest rewrote the used entry of head %d "
                                  "(it names %d) before the restart; head %d stays completed",
                                  getattr(memory, "vm_id", "?"), self.index, completing, entry,
                                  completing)
        if problem is not None:
            self.reset()
            raise QueueError(f"queue {self.index}: {problem}")
        for head in ages:
            self._in_flight[head] = marks[head]
        self.last_avail_idx = self._avail_idx = self._indices[0] = last_avail_idx
        self.used_idx = self._signalled_used = self._indices[1] = used_idx
        self._replay.extend(sorted(ages, key=ages.get, reverse=True))
        return list(self._replay)

    # -- the chain iterator ---------------------------------------------------------

    @property
    def budget(self):
        """Bytes of work this turn has left (``TURN_BYTES`` less its chains and charges;
        at most 0 once spent)."""
        return self._turn_bytes

    def charge(self, nbytes):
        """Count ``nbytes`` of a request's work beyond its chain's own bytes (a GPU transfer's
        copy) against this turn's byte budget."""
        self._turn_bytes -= nbytes

    def pop(self):
        """The next available chain, or None when there is none (or the queue is broken).

        Bad chains are completed here with length 0 and skipped (then
        ``on_used`` signals them); ring corruption breaks the queue
        (``on_error``). With EVENT_IDX the device's ``avail_event`` is updated
        whenever the ring is found empty, so the driver notifies for the next
        buffer.
        """
        bad = self._bad_chain_log.count
        chain = self._next_chain()
        if self._bad_chain_log.count != bad and self.on_used is not None:
            self.on_used(self)
        return chain

    def _pending(self):
        """How many entries the driver made available past ``last_avail_idx``. With
        EVENT_IDX, finding none first sets ``avail_event`` to ask the driver to notify for
        the next one (2.7.10), then looks again (a fence between: store, then load)."""
        # The acquire load of the avail idx covers every entry below it, so it is
        # only repeated once the entries seen last time are consumed.
        pending = (self._avail_idx - self.last_avail_idx) & 0xFFFF
        if not pending:
            self._avail_idx = self._load_avail_idx()
            pending = (self._avail_idx - self.last_avail_idx) & 0xFFFF
        if not pending and self.event_idx:
            self._used_h[2 + 4 * self.size] = self.last_avail_idx   # avail_event
            ordering.fence()
            self._avail_idx = self._load_avail_idx()
            pending = (self._avail_idx - self.last_avail_idx) & 0xFFFF
        return pending

    def _next_chain(self):
        if self._replay and self.ready and not self.broken:
            return self._replayed()
        while self.ready and not self.broken:
            if min(self._turn_chains, self._turn_descriptors, self._turn_bytes) <= 0:
                # Out of budget: come back for what is there; and if the turn took the
                # ring's last entry, ask for the next notify, as an empty ring does (else
                # the driver adds buffers without notifying and the queue stalls).
                if not self.yielded and self._pending():
                    self.yielded = True
                    if self.on_yield is not None:
                        self.on_yield(self)
                return None
            pending = self._pending()
            if not pending:
                return None
            if pending > self.size:
                self._break(f"available index moved {pending} entries past the last seen "
                            f"one (queue size {self.size})")
                return None
            head = self._avail[2 + (self.last_avail_idx & (self.size - 1))]
            self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
            if head >= self.size:
                self._break(f"available ring offers head {head} >= queue size {self.size}")
                return None
            if self._in_flight[head]:
                self._break(f"available ring offers head {head} which is already in flight")
                return None
            self._in_flight[head] = self.last_avail_idx or 0x10000   # its position + 1
            self._indices[0] = self.last_avail_idx
            chain = self._charged(head, "")
            if chain is not None:
                return chain
        return None

    def _charged(self, head, when):
        """Chain ``head`` walked and charged to the turn; a bad one is completed with
        length 0 (logged, rate-limited) and gives None."""
        self._turn_chains -= 1
        table = self._table
        chain = table.walk(head, self.indirect)
        self._turn_descriptors -= table.walked
        if chain.__class__ is DescriptorChain:
            self._turn_bytes -= chain.readable_len + chain.writable_len
            return chain
        self._bad_chain_log("vm%s queue %d: bad descriptor chain at head %d%s: %s; completed "
                            "with length 0", getattr(self.memory, "vm_id", "?"), self.index,
                            head, when, chain)
        self.add_used(DescriptorChain(head, (), (), 0, 0, self.generation), 0)
        return None

    def _replayed(self):
        """The next chain that was in flight when the previous process died (``restore``),
        walked again; a bad one is completed with length 0 like in ``_next_chain``."""
        while self._replay:
            chain = self._charged(self._replay.popleft(), " (in flight at the restart)")
            if chain is not None:
                return chain
        return self._next_chain()

    @property
    def replaying(self):
        """Heads in flight at the restart, not yet handed back by ``pop`` (``restore``)."""
        return tuple(self._replay)

    def position(self, head):
        """The available-ring position chain ``head`` was popped from (it is in flight)."""
        return (self._in_flight[head] - 1) & 0xFFFF

    def __iter__(self):
        """Pop chains until none is available: ``for chain in queue: ...``."""
        while (chain := self.pop()) is not None:
            yield chain

    def has_available(self):
        """True if the driver has made buffers available that were not popped yet (those
        in flight at a restart included, ``restore``)."""
        if not self.ready or self.broken:
            return False
        return bool(self._replay) or self._load_avail_idx() != self.last_avail_idx

    # -- returning buffers ---------------------------------------------------------------

    def add_used(self, chain, length):
        """Return ``chain`` (popped from this queue) to the driver with ``length`` bytes
        written into it.

        Returns False, and touches nothing, for a chain of another generation (popped
        before the queue's last reset, or from another queue) or one already returned:
        device bugs (a held chain not dropped in a reset hook, a chain returned twice),
        which a guest may repeat by resetting, so logged once, then rate-limited (ERROR;
        ``testing.hostile.internal_errors``, thus the fuzz tests and ``bench.soak``, count
        it as a failure) and counted (``refused``).
        """
        head, in_flight = chain.head, self._in_flight
        if chain.generation != self.generation or not in_flight[head]:
            self._refused_log("vm%s queue %d: add_used of head %d which is not in flight "
                              "(%s; ignored)", getattr(self.memory, "vm_id", "?"), self.index,
                              head, "returned already" if chain.generation == self.generation
                              else "popped before a reset of the queue, or from another")
            return False
        slot = 2 * (self.used_idx & (self.size - 1))
        self._used_ring[slot] = head
        self._used_ring[slot + 1] = length
        self.used_idx = used_idx = (self.used_idx + 1) & 0xFFFF
        indices = self._indices                    # the order: see ``restore``
        indices[1] = 0x80000000 | head << 16 | used_idx        # USED_KEPT: a constant here
        self._store_used_idx(used_idx)
        in_flight[head] = 0
        indices[1] = used_idx
        return True

    # -- notification suppression (2.7.7, 2.7.10) -----------------------------------------

    def needs_notification(self):
        """True if the driver wants an interrupt for the used entries since the last call."""
        new, old = self.used_idx, self._signalled_used
        if new == old or not self.ready:
            return False
        self._signalled_used = new
        ordering.fence()     # the used idx store before the used_event / flags load
        if self.event_idx:
            used_event = self._avail[2 + self.size]
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self._avail[0] & AVAIL_F_NO_INTERRUPT

    def set_notification(self, enabled):
        """Ask the driver to notify (or not) for new available buffers.

        Returns True if buffers are available (re-check after enabling: the
        driver may have added some while notifications were off).
        """
        if not self.ready:
            return False
        if self.event_idx:
            if enabled:
                self._used_h[2 + 4 * self.size] = self.last_avail_idx
        else:
            self._used_h[0] = 0 if enabled else USED_F_NO_NOTIFY
        ordering.fence()
        return self.has_available()

    # -- errors and debugging ----------------------------------------------------------------

    def _break(self, reason):
        """Ring corruption: the queue stops; ``on_error`` (the device) logs it, rate-limited
        like every line a guest can cause."""
        self.broken = True
        if self.on_error is not None:
            self.on_error(f"queue {self.index}: {reason}")
        else:
            self._break_log("vm%s queue %d: %s; device needs reset",
                            getattr(self.memory, "vm_id", "?"), self.index, reason)

    def describe(self):
        """A JSON-able snapshot for ``info`` and debugging."""
        return {
            "index": self.index, "max_size": self.max_size, "size": self.size,
            "ready": self.ready, "broken": self.broken,
            "desc": address(self.desc_addr), "driver": address(self.driver_addr),
            "device": address(self.device_addr),
            "last_avail_idx": self.last_avail_idx, "used_idx": self.used_idx,
            "in_flight": self.in_flight, "event_idx": self.event_idx,
            "indirect": self.indirect, "bad_chains": self.bad_chains,
            "refused": self.refused, "generation": self.generation,
        }
