"""The stub's interrupt line (``StubInterruptLine``) on a trap page in memory: the request
bit, and the UART byte sent or spared by the stub's ``virq_polling`` (AVT_F_HALT_POLL).
With the real stub: tests/test_emulated_stub.py."""

import pytest

from avatar_hw import abi
from avatar_hw.errors import AvatarError
from avatar_hw.hw import ordering
from avatar_hw.hw.region import Region
from avatar_hw.interrupts import StubInterruptLine


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
    monkeypatch.setattr(ordering, "fence", stub_takes_and_stops_polling)
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
