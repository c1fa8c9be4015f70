"""The stub's interrupt line (``StubInterruptLine``) on a trap page in memory: the request
bit, and the UART byte sent or spared by the stub's ``virq_polling`` (AVT_F_HALT_POLL) and
``rings_taken`` (AVT_F_RINGS_TAKEN: the protocol against the stub's handler step by step).
With the real stub: tests/test_emulated_stub.py."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avatar_hw import abi
from avatar_hw.errors import AvatarError
from avatar_hw.hw import ordering
from avatar_hw.hw.region import Region
from avatar_hw.interrupts import StubInterruptLine
from patching import this_thread_only


def after_fence(action):
    """``ordering.fence`` that also runs ``action`` after the fence, in this thread only: a
    daemon of the session's emulated board may run meanwhile, and keeps its fences."""
    fence = ordering.fence

    def hooked():
        fence()
        action()
    return this_thread_only(fence, hooked)


@pytest.fixture
def page():
    region = Region(bytearray(abi.PAGE_SIZE), name="test trap page")
    rings = []
    line = StubInterruptLine(region, ring_stub=lambda: rings.append(1))
    header = abi.Header.from_buffer(region.view(0, abi.SLOTS_OFFSET))
    return line, header, rings


def test_a_request_rings_the_stub_unless_it_polls_for_that_intid(page):
    line, header, rings = page
    line.raise_intid(48)                                    # nobody polls: the byte goes
    assert header.virq_pending[1] == 1 << 16 and len(rings) == 1
    header.virq_polling[1] = 0xff << 16                     # VM0's CPU polls (INTIDs 48-55)
    line.raise_intid(49)
    assert header.virq_pending[1] == 0b11 << 16 and len(rings) == 1
    line.raise_intid(56)                                    # VM1's INTID: its CPU does not
    assert header.virq_pending[1] == (0b11 << 16) | (1 << 24) and len(rings) == 2
    header.virq_polling[1] = 0                              # the poll ended: the byte again
    line.raise_intid(50)
    assert len(rings) == 3
    assert line.info() == {"stub_rings": 3, "stub_rings_skipped": 1, "stub_rings_taken": 0}


def test_a_request_the_stub_took_already_needs_no_ring(page, monkeypatch):
    """A poll that saw the bit takes it, then clears polling: a line that reads polling
    clear after that finds its bit gone from virq_pending and does not ring."""
    line, header, rings = page

    def stub_takes_and_stops_polling():     # between the line's OR and its look
        header.virq_pending[1] &= ~(1 << 16)
        header.virq_polling[1] = 0

    header.virq_polling[1] = 0xff << 16
    monkeypatch.setattr(ordering, "fence", after_fence(stub_takes_and_stops_polling))
    line.raise_intid(48)
    assert not rings and line.rings_skipped == 1


def test_a_request_still_pending_needs_no_second_ring(page):
    """The stub has not taken the first request (it was rung for it): a second request of
    that INTID is taken with it, as a GIC holds one pending edge. Once taken, the next
    request rings again."""
    line, header, rings = page
    line.raise_intid(48)
    line.raise_intid(48)
    line.raise_intid(49)                                    # another INTID: its own ring
    assert len(rings) == 2 and line.rings_skipped == 1
    assert header.virq_pending[1] == 0b11 << 16
    header.virq_pending[1] = 0                              # the stub takes both
    line.raise_intid(48)
    assert len(rings) == 3


def test_a_request_left_by_a_model_that_died_before_its_ring_is_rung_for(page):
    """The previous model set the bit and died before its ring: the next one, attached,
    rings once (else the stub hears of it only at the guest's next exit, and every later
    request of that INTID finds its bit set and does not ring)."""
    line, header, rings = page
    line.attach(0)
    assert not rings
    header.virq_pending[1] = 1 << 16
    line.attach(0)
    assert len(rings) == 1 and line.rings == 1


def test_with_rings_taken_a_ring_not_yet_taken_is_not_sent_again(page):
    """AVT_F_RINGS_TAKEN: after a ring the line sends no other until the stub's
    rings_taken moved (it counts each time it empties its UART, then looks at
    virq_pending): the stub's FIFO never fills. Each request still sets its bit."""
    line, header, rings = page
    line.attach(abi.F_RINGS_TAKEN)
    line.raise_intid(48)
    line.raise_intid(49)                                    # the stub has not taken the ring
    line.raise_intid(56)
    assert len(rings) == 1 and line.rings_skipped == 2
    assert header.virq_pending[1] == (0b11 << 16) | (1 << 24)
    header.virq_pending[1] = 0                              # the stub empties its UART,
    header.rings_taken += 1                                 # counts, then takes the bits
    line.raise_intid(48)
    line.raise_intid(50)
    assert len(rings) == 2 and line.rings_skipped == 3
    header.rings_taken += 1
    line.raise_intid(51)
    assert len(rings) == 3


def test_without_rings_taken_each_new_request_rings(page):
    """A stub that does not offer the feature never counts: a line whose model did not
    accept it rings for every request it cannot skip otherwise, as before ABI 1.5."""
    line, header, rings = page
    line.attach(0)
    for intid in (48, 49, 56):
        line.raise_intid(intid)
    assert len(rings) == 3


def test_a_model_that_attaches_rings_for_a_left_request_whatever_the_count(page):
    """A new model knows nothing of its predecessor's rings: it rings once for a bit left
    set, and counts from there."""
    line, header, rings = page
    header.rings_taken = 7
    header.virq_pending[1] = 1 << 16
    line.attach(abi.F_RINGS_TAKEN)
    assert len(rings) == 1
    line.raise_intid(49)                                    # count still 7: not taken yet
    assert len(rings) == 1
    header.rings_taken = 8
    line.raise_intid(50)
    assert len(rings) == 2


def test_the_polling_word_is_the_intids_own(page):
    line, header, rings = page
    header.virq_polling[2] = 1 << 0                         # INTID 64, not 32 or 96
    for intid in (32, 96, 64):
        line.raise_intid(intid)
    assert len(rings) == 2 and line.rings_skipped == 1
    assert [header.virq_pending[w] for w in (1, 2, 3)] == [1, 1, 1]


def test_an_intid_outside_the_spis_is_refused(page):
    line, header, rings = page
    with pytest.raises(AvatarError, match="INTID 16 is outside 32..255"):
        line.raise_intid(16)
    assert not rings and not any(header.virq_pending)


class UartStub:
    """The emulated stub's side of AVT_F_RINGS_TAKEN as single steps (boards/emulated/log.c,
    trap.c ``trap_take_rings``), over QEMU's PL011 as it behaves: a byte that makes the FIFO
    go from 0 to 1 raises the RX interrupt, which stays raised until cleared (UARTICR).
    ``order``: the handler's steps; the stub's is ``HANDLER``."""

    HANDLER = ("clear", "flush", "count", "look")

    def __init__(self, header, order=HANDLER):
        self.header, self.order = header, order
        self.in_flight = self.fifo = 0      # bytes sent, not yet in the FIFO; in the FIFO
        self.irq = False
        self.pc = None                      # the handler's next step, None: not running
        self.took = 0

    def ring(self):
        self.in_flight += 1

    def deliver(self):
        if self.in_flight:
            self.in_flight -= 1
            self.fifo += 1
            self.irq = self.irq or self.fifo == 1

    def step(self):
        if self.pc is None and not self.irq:
            return
        self.pc = self.pc or 0
        action = self.order[self.pc]
        if action == "clear":
            self.irq = False
        elif action == "flush":
            self.fifo = 0
        elif action == "count":
            self.header.rings_taken += 1
        else:
            self.took |= self.header.virq_pending[1]
            self.header.virq_pending[1] = 0
        self.pc = None if self.pc == len(self.order) - 1 else self.pc + 1

    def act(self, choice):
        (self.deliver if choice else self.step)()

    def settle(self):
        """What happens with the model quiet: every byte arrives, every interrupt is taken."""
        while self.in_flight or self.irq or self.pc is not None:
            self.deliver()
            self.step()


def raise_all(page, stub, intids, interleave):
    """The line raises each of ``intids`` while ``interleave(where)`` runs stub steps at the
    points another CPU could: before the request, between the line's OR and its read of
    ``rings_taken`` (its fence), and between that read and the byte's arrival."""
    line, header, _ = page
    line._ring_stub = lambda: (interleave("ring"), stub.ring())
    fence = ordering.fence
    ordering.fence = after_fence(lambda: interleave("fence"))
    try:
        line.attach(abi.F_RINGS_TAKEN)
        for intid in intids:
            interleave("before")
            line.raise_intid(intid)
    finally:
        ordering.fence = fence
    stub.settle()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_with_rings_taken_no_request_is_left_untaken_whatever_the_interleaving(data):
    """AVT_F_RINGS_TAKEN against the stub's handler step by step: whatever the stub does
    between the line's steps, once things settle every requested INTID was taken; and
    the stub's FIFO held at most two bytes."""
    region = Region(bytearray(abi.PAGE_SIZE), name="test trap page")
    header = abi.Header.from_buffer(region.view(0, abi.SLOTS_OFFSET))
    stub = UartStub(header)
    page = (StubInterruptLine(region, ring_stub=None), header, None)
    most = [0]

    def interleave(where):
        for choice in data.draw(st.lists(st.booleans(), max_size=6), label=where):
            stub.act(choice)
            most[0] = max(most[0], stub.fifo + stub.in_flight)

    raise_all(page, stub, [48, 49, 50, 48, 51], interleave)
    assert header.virq_pending[1] == 0 and stub.took == 0b1111 << 16
    assert most[0] <= 2


def test_a_stub_that_counted_before_clearing_its_interrupt_would_lose_a_request(page):
    """Why the count follows the clear (trap-abi.md section 8): counted first, a ring sent
    for the new count can arrive while the interrupt is still raised, be cleared and
    flushed with the old one, and the next request, seeing no new count, sends nothing."""
    line, header, _ = page
    stub = UartStub(header, order=("count", "clear", "flush", "look"))
    script = iter([
        ("before", []),                     # 48: rung, and its byte arrives
        ("fence", []), ("ring", []),
        ("before", [True, False]),          # the stub counts, before clearing
        ("fence", []), ("ring", []),        # 49 rings for the new count
        ("before", [True, False, False, False]),   # its byte arrives, is cleared, flushed
        ("fence", []),                      # 50: no new count, no ring
    ])

    def interleave(where):
        expected, choices = next(script)
        assert where == expected
        for choice in choices:
            stub.act(choice)

    raise_all(page, stub, [48, 49, 50], interleave)
    assert header.virq_pending[1] == 1 << 18          # 50 waits for a ring that never comes
