"""The model side of the trap page against the stand-in stub's side, on one shared page."""

import logging
import os
import subprocess
import sys
import threading
import tracemalloc

import pytest

from avatar_hw import abi, wait
from avatar_hw.hw.region import Region
from avatar_hw.layout import Layout
from avatar_hw.testing.standin_stub import StubPage, TrapTimeout
from avatar_hw.trap import (FAIR_WINDOW_NS, MAX_TRAPS_PER_CALL, POLL_CHECK_SCANS, StubNotReady,
                             TrapPage)
from avatar_hw.wait import ADAPTIVE, BUSY_POLL, PollWindow
from patching import this_thread_only

LAYOUT = Layout()
VM0_DEV0 = LAYOUT.window(0, 0)
VM1_DEV0 = LAYOUT.window(1, 0)


def address(window, offset):
    """The guest-physical address a ``dispatch(window, offset, ...)`` call stands for."""
    return LAYOUT.base + window * LAYOUT.device_size + offset


class Recorder:
    """A dispatch answering reads with a register file; records every call (by address)."""

    def __init__(self):
        self.calls = []
        self.registers = {}

    def __call__(self, window, offset, value, is_write, size):
        addr = address(window, offset)
        self.calls.append((addr, value, is_write, size))
        if window % LAYOUT.windows_per_vm != 0:
            return False, 0                      # only device 0 exists
        if is_write:
            self.registers[addr] = value
            return True, 0
        return True, self.registers.get(addr, 0)


@pytest.fixture
def page():
    region = Region(bytearray(abi.PAGE_SIZE), name="test trap page")
    stub = StubPage(region)
    stub.initialise(slot_count=4)
    trap = TrapPage(region, LAYOUT)
    trap.wait_ready(0)
    trap.attach()
    return stub, trap


def exchange(stub, trap, handler, *args, **kw):
    """Post one trap, let the model serve it, return the stub's ``(status, data)``."""
    stub.begin(*args, **kw)
    trap.serve_until_idle(handler)
    return stub.finish(args[0])


def test_attach_publishes_accepted_features_pid_and_state(page):
    stub, trap = page
    h = stub.header
    assert h.model_state == abi.MODEL_ATTACHED
    assert h.model_features == abi.SUPPORTED_FEATURES & h.stub_features
    assert h.model_pid > 0
    assert h.model_sleeping == 1


def test_model_accepts_only_features_the_stub_offers():
    region = Region(bytearray(abi.PAGE_SIZE))
    StubPage(region).initialise(1, features=abi.F_POSTED_WRITES | (1 << 7))
    trap = TrapPage(region, LAYOUT)
    trap.attach()
    assert trap.header.model_features == abi.F_POSTED_WRITES


def test_read_and_write_round_trip(page):
    stub, trap = page
    handler = Recorder()
    assert exchange(stub, trap, handler, 0, 0, VM0_DEV0 + 0x70, 4, True, 0x0F) == (0, 0)
    assert exchange(stub, trap, handler, 1, 0, VM0_DEV0 + 0x70, 4, False) == (0, 0x0F)
    assert handler.calls == [(VM0_DEV0 + 0x70, 0x0F, True, 4), (VM0_DEV0 + 0x70, 0, False, 4)]
    assert trap.stats.served == 2


def test_read_result_is_zero_extended_to_the_access_size(page):
    stub, trap = page
    assert exchange(stub, trap, lambda *a: (True, 0x1_2345_6789), 0, 0, VM0_DEV0 + 0x100, 2,
                    False) == (abi.STATUS_OK, 0x6789)


@pytest.mark.parametrize("fields", [
    dict(gpa=VM0_DEV0 + 0x1000 * 9, size=4, is_write=False),     # no device slot there
    dict(gpa=0x4000_0000, size=4, is_write=False),                # guest RAM, not the window
    dict(gpa=VM0_DEV0 + 0x70, size=3, is_write=False),            # size 3
    dict(gpa=VM0_DEV0 + 0x70, size=4, is_write=False, direction=7),
    dict(gpa=VM1_DEV0 + 0x70, size=4, is_write=True, value=0),   # VM 0 in VM 1's window
    dict(gpa=VM0_DEV0 + 0x72, size=4, is_write=False),            # not aligned
    dict(gpa=VM0_DEV0 + 0x70, size=1, is_write=True, value=0x1FF),  # value wider than size
    dict(gpa=VM0_DEV0 + 0x70, size=4, is_write=True, value=1 << 32),  # ... than 4 bytes
    dict(gpa=VM0_DEV0 + 0x70, size=4, is_write=False, vm_id=0xFFFF),
])
def test_malformed_traps_get_unhandled_and_the_model_keeps_serving(page, fields, caplog):
    stub, trap = page
    handler = Recorder()
    fields = dict(fields)
    raw = {k: fields.pop(k) for k in ("direction", "vm_id") if k in fields}
    status, data = exchange(stub, trap, handler, 0, 0, fields.pop("gpa"), fields.pop("size"),
                            fields.pop("is_write"), fields.pop("value", 0), raw=raw)
    assert (status, data) == (abi.STATUS_UNHANDLED, 0)
    # Only a well-formed access to an empty device slot reaches the handler (which declines).
    assert all((c[0] - LAYOUT.base) % LAYOUT.vm_size // LAYOUT.device_size != 0
               for c in handler.calls)
    assert exchange(stub, trap, handler, 0, 0, VM0_DEV0, 4, False) == (abi.STATUS_OK, 0)
    # Both are counted as served; only the second is device 0's and so VM 0's.
    assert trap.stats.served == 2
    assert trap.vm_counters(0)["traps_served"] == trap.window_counters(0)["traps_waited"] == 1


def test_garbage_in_every_slot_field_never_raises(page):
    stub, trap = page
    handler = Recorder()
    for pattern in (0x00, 0xFF, 0xA5, 0x5A):
        raw = dict(seq=pattern * 0x01010101, size=pattern, direction=pattern, flags=pattern,
                   status=pattern, vm_id=pattern * 0x101, vcpu_id=pattern * 0x101,
                   data=pattern * 0x0101010101010101, gpa=pattern * 0x0101010101010101)
        stub.begin(0, 0, VM0_DEV0, 4, False, raw=raw)
        trap.serve_until_idle(handler)
        state = stub.region.read32(abi.SLOTS_OFFSET)
        assert state in (abi.SLOT_DONE, abi.SLOT_FREE)
        if state == abi.SLOT_DONE:
            assert stub.slots[0].status == abi.STATUS_UNHANDLED
            stub.region.store_release32(abi.SLOTS_OFFSET, abi.SLOT_FREE)
    assert trap.stats.malformed == 4


def test_handler_exception_is_logged_and_answered_unhandled(page, caplog):
    stub, trap = page

    def broken(*args):
        raise RuntimeError("device bug")

    with caplog.at_level(logging.ERROR, logger="avatar_hw.trap"):
        assert exchange(stub, trap, broken, 0, 0, VM0_DEV0, 4, False) == (1, 0)
    assert "device bug" in caplog.text
    assert trap.stats.handler_errors == 1


def test_a_handler_exception_repeated_by_a_guest_is_counted_and_its_lines_rate_limited(
        page, caplog):
    """A device bug a guest's access reaches, repeated at trap rate: every one counted,
    only the first ones (and one in 1000) logged at ERROR with their traceback."""
    stub, trap = page

    def broken(*args):
        raise RuntimeError("device bug")

    with caplog.at_level(logging.ERROR, logger="avatar_hw.trap"):
        for _ in range(3000):
            assert exchange(stub, trap, broken, 0, 0, VM0_DEV0, 4, False) == (1, 0)
    assert trap.stats.handler_errors == 3000
    lines = [r for r in caplog.records if "dispatch failed" in r.getMessage()]
    assert 10 <= len(lines) <= 13 and all(r.exc_info for r in lines)


def test_posted_write_is_handled_and_the_model_frees_the_slot(page):
    stub, trap = page
    handler = Recorder()
    stub.begin(0, 0, VM0_DEV0 + 0x50, 4, True, 1, posted=True)
    trap.serve_until_idle(handler)
    assert stub.region.read32(abi.SLOTS_OFFSET) == abi.SLOT_FREE
    assert handler.calls == [(VM0_DEV0 + 0x50, 1, True, 4)]
    assert trap.stats.posted_writes == 1


def test_stub_rings_only_while_the_model_sleeps(page):
    stub, trap = page
    handler = Recorder()
    exchange(stub, trap, handler, 0, 0, VM0_DEV0, 4, False)
    assert stub.rings == 1 and stub.header.model_sleeping == 1
    stub.header.model_sleeping = 0          # as while the model is scanning
    exchange(stub, trap, handler, 0, 0, VM0_DEV0, 4, False)
    assert stub.rings == 1


def test_rescan_before_sleeping_serves_a_trap_posted_without_a_ring(page):
    """A post that read model_sleeping == 0 (no ring) is served by the re-scan."""
    stub, trap = page
    handler = Recorder()
    original_fence = trap.any_posted

    def post_during_rescan():
        # The stub posts between the model's scan and its fenced re-check.
        stub.header.model_sleeping = 0
        stub.begin(0, 0, VM0_DEV0, 4, False)
        trap.any_posted = original_fence
        return original_fence()

    trap.any_posted = post_during_rescan
    trap.serve_until_idle(handler)
    assert stub.rings == 0
    assert stub.finish(0) == (abi.STATUS_OK, 0)


def test_a_restarted_stub_rings_for_a_slot_the_dead_one_posted_without_ringing(page):
    """A stub that died between its store of POSTED and its ring left the model asleep:
    the next one's recover() rings, else nothing serves the slot (TrapTimeout)."""
    stub, trap = page
    handler = Recorder()
    trap.serve_until_idle(handler)
    assert stub.header.model_sleeping == 1                 # asleep on the doorbell
    stub.begin(1, 0, VM0_DEV0, 4, False)                   # the ring is lost: ring does nothing
    again = StubPage(stub.region, ring=lambda: trap.serve_until_idle(handler))
    again.attach_views()
    again.recover(timeout=1.0)
    assert again.rings == 1 and handler.calls == [(VM0_DEV0, 0, False, 4)]
    assert stub.region.read32(abi.SLOTS_OFFSET + abi.SLOT_SIZE) == abi.SLOT_FREE


def test_a_wait_ends_once_the_model_s_process_is_gone_and_takes_an_answer_given_before(page):
    """``StubPage.model_alive`` (tests against a daemon they kill): a wait with a 30 s
    timeout raises TrapTimeout as soon as it says gone; an answer already given is taken."""
    stub, trap = page
    stub.model_alive = lambda: False
    stub.begin(0, 0, VM0_DEV0, 4, False)
    with pytest.raises(TrapTimeout, match="process is gone"):
        stub.finish(0, timeout=30)
    stub.region.store_release32(abi.SLOTS_OFFSET, abi.SLOT_FREE)
    stub.begin(0, 0, VM0_DEV0, 4, False)
    trap.serve_until_idle(Recorder())
    assert stub.finish(0, timeout=30) == (abi.STATUS_OK, 0)


def test_busy_poll_keeps_model_sleeping_clear():
    region = Region(bytearray(abi.PAGE_SIZE))
    stub = StubPage(region)
    stub.initialise(1)
    trap = TrapPage(region, LAYOUT)
    trap.attach(wait=BUSY_POLL)
    assert exchange(stub, trap, Recorder(), 0, 0, VM0_DEV0, 4, False) == (0, 0)
    assert stub.rings == 0 and stub.header.model_sleeping == 0


@pytest.fixture
def switches(monkeypatch):
    """The time waited for a CPU ``PollWindow`` sees (``PollWindow._thread_times``), and a
    core always spare (``SpareCores.measure``): the test's, not the loaded machine's."""
    count = [0]
    monkeypatch.setattr(wait.PollWindow, "_thread_times", lambda self: (0, count[0]))
    monkeypatch.setattr(wait.SpareCores, "measure", lambda self, now, on_cpu, delay: None)
    return count


@pytest.fixture
def adaptive(switches):
    """A page served in the adaptive mode, its window held open (an hour) until a test
    closes it: what the window does is decided here, not by the clock or the scheduler."""
    region = Region(bytearray(abi.PAGE_SIZE), name="test trap page")
    stub = StubPage(region)
    stub.initialise(slot_count=2)
    trap = TrapPage(region, LAYOUT)
    trap.attach(wait=ADAPTIVE)
    assert not trap.polling and stub.header.model_sleeping == 1   # sleeps until a first trap
    trap.window.ns = trap.window.max_ns = 3600 * 10**9
    return stub, trap


def polling_after_a_trap(adaptive):
    """``adaptive``'s page after one trap served: polling; returns (stub, trap, handler)."""
    stub, trap = adaptive
    handler = Recorder()
    stub.begin(0, 0, VM0_DEV0, 4, False)
    trap.serve_until_idle(handler)
    stub.finish(0)
    return stub, trap, handler


def test_adaptive_polls_after_a_trap_and_serves_the_next_one_without_a_ring(adaptive):
    stub, trap = adaptive
    handler = Recorder()
    stub.begin(0, 0, VM0_DEV0, 4, True, 1)
    assert stub.rings == 1                        # the model slept: the stub rang
    assert trap.serve_until_idle(handler) == 1
    assert stub.finish(0) == (abi.STATUS_OK, 0)
    # The window is open: the model keeps scanning, model_sleeping clear, the stub silent.
    assert trap.polling and stub.header.model_sleeping == 0
    stub.begin(1, 0, VM0_DEV0, 4, False)
    assert stub.rings == 1
    assert trap.serve_until_idle(handler) == 1
    assert stub.finish(1) == (abi.STATUS_OK, 1)
    assert trap.polling and stub.header.model_sleeping == 0
    info = trap.info()
    assert info["wait"] == ADAPTIVE and not info["busy_poll"]
    assert info["poll_window_ns"] == trap.window.ns


def test_adaptive_arms_the_doorbell_once_its_window_passed_in_vain(adaptive):
    stub, trap, handler = polling_after_a_trap(adaptive)
    assert trap.polling
    trap.window.ns = 0                            # the window has passed with nothing found
    scans = []
    original_scan = trap.scan_once
    trap.scan_once = lambda dispatch: scans.append(1) or original_scan(dispatch)
    assert trap.serve_until_idle(handler) == 0
    assert not trap.polling and stub.header.model_sleeping == 1
    assert len(scans) == POLL_CHECK_SCANS         # scans until it looked at the window
    stub.begin(1, 0, VM0_DEV0, 4, False)
    assert stub.rings == 2                        # sleeping again: the next trap rings
    trap.serve_until_idle(handler)
    assert stub.finish(1) == (abi.STATUS_OK, 0)


def test_adaptive_arming_rescans_after_the_fence_and_grows_the_window(adaptive):
    """The stub posts between the model's last scan of the window and its fenced re-scan:
    served there, without a ring (docs/trap-abi.md, "Notification"), and polling resumes."""
    stub, trap, handler = polling_after_a_trap(adaptive)
    trap.window.ns = 0
    original = trap.any_posted

    def post_during_rescan():
        assert stub.header.model_sleeping == 1    # set before the re-scan (then the fence)
        stub.header.model_sleeping = 0            # as the stub read it just before
        stub.begin(1, 0, VM0_DEV0, 4, False)
        trap.any_posted = original
        return original()

    trap.any_posted = post_during_rescan
    assert trap.serve_until_idle(handler) == 1
    assert stub.rings == 1 and stub.finish(1) == (abi.STATUS_OK, 0)
    assert trap.window.grown == 1 and trap.window.ns == trap.window.start_ns   # a near miss
    # ... then polled the (10 us) window again; armed again if it passed meanwhile.
    assert stub.header.model_sleeping == (0 if trap.polling else 1)


def test_adaptive_gives_the_cpu_back_when_the_kernel_preempted_the_poll(adaptive, switches):
    stub, trap, handler = polling_after_a_trap(adaptive)
    assert trap.polling
    switches[0] += wait.POLL_CONTENDED_NS         # a short wait for the CPU: polls on
    assert trap.serve_until_idle(handler) == 0 and trap.polling
    switches[0] += 1                              # more: another task keeps wanting this CPU
    assert trap.serve_until_idle(handler) == 0
    assert not trap.polling and stub.header.model_sleeping == 1
    assert trap.window.ns == 0 and trap.info()["poll_preempted"] == 1
    # For POLL_HOLD_NS after that, a near miss does not open a window again.
    window = trap.window
    assert not window.found(window.hold_until - 1) and window.ns == 0
    assert window.found(window.hold_until) and window.ns == window.start_ns


def test_poll_window_holds_the_same_after_each_give_up(switches):
    """Preempted while polling, again and again: each give-up shuts the window for
    POLL_HOLD_NS, no longer (a host with no core free at all is SpareCores' to see)."""
    window = PollWindow(0)
    now = 0
    for _ in range(5):
        window.ns = window.start_ns
        assert not window.over(now)               # the first look sets the base
        switches[0] += wait.POLL_CONTENDED_NS + 1
        assert window.over(now) and window.hold_until - now == wait.POLL_HOLD_NS
        assert window.ns == 0 and not window.found(window.hold_until - 1)
        now = window.hold_until
    assert window.preempted == 5


def test_poll_window_grows_on_near_misses_and_shrinks_on_long_waits(switches):
    us = 1000
    window = PollWindow(0, max_ns=1000 * us, start_ns=10 * us)
    assert window.ns == 0 and window.expired(1)
    assert window.found(300 * us)                 # missed by 300 us: start
    assert window.ns == 10 * us
    now = 300 * us
    for expected in (20, 40, 80, 160, 320, 640, 1000):
        now += window.ns + us                     # a wait the window just missed
        assert window.found(now) and window.ns == expected * us   # doubles, up to max_ns
    now += 900 * us                               # caught within the window: unchanged
    assert window.found(now) and window.ns == 1000 * us
    assert not window.expired(now + 1000 * us) and window.expired(now + 1000 * us + 1)
    for expected in (500, 250, 125):              # idle past max_ns: halved each time
        now += 5_000 * us
        assert window.found(now) and window.ns == expected * us
    assert window.info() == {"poll_window_ns": 125 * us, "poll_grown": 8, "poll_shrunk": 3,
                             "poll_preempted": 0, "poll_spare_cores": None,
                             "poll_no_spare_core": 0}
    assert not window.over(now) and window.over(now + 125 * us + 1)
    for expected in (62_500, 31_250, 15_625):
        now += 5_000 * us
        assert window.found(now) and window.ns == expected
    now += 5_000 * us                             # 7.8 us is below the start: 0
    assert not window.found(now) and window.ns == 0   # an idle guest: back to the doorbell
    assert window.over(now + 1)


def write_stat(path, idle_ticks, iowait_ticks=0, nice_ticks=0):
    """A /proc/stat first line (user nice system idle iowait irq softirq steal)."""
    path.write_text(f"cpu  500 {nice_ticks} 200 {idle_ticks} {iowait_ticks} 0 0 0 0 0\n"
                    "cpu0 1 2 3\n")


def test_spare_cores_counts_idle_time_and_the_poll_s_own_run_less_its_waits(tmp_path,
                                                                           monkeypatch):
    nice = [0]                                    # the poll's nice, whatever pytest's is
    monkeypatch.setattr(os, "getpriority", this_thread_only(os.getpriority,
                                                          lambda which, who: nice[0]))
    stat = tmp_path / "stat"
    tick = 10**9 // os.sysconf("SC_CLK_TCK")
    spare = wait.SpareCores(str(stat))
    write_stat(stat, 1000)
    assert spare.measure(0, 0, 0) is None          # a first measure has nothing to compare
    s = 10**9
    write_stat(stat, 1000 + s // 2 // tick, s // 4 // tick)   # idle 0.5 s, iowait 0.25 s
    assert spare.measure(s, 0, 0) == pytest.approx(0.75)
    write_stat(stat, 1000 + s * 3 // 4 // tick, s // 4 // tick)
    # 1 s: idle 0.25 s, the poll ran 0.7 s of it and waited 0.2 s for a CPU: 0.75.
    assert spare.measure(2 * s, s * 7 // 10, s // 5) == pytest.approx(0.75)
    # Another 1 s: never idle, the poll ran 0.6 s and waited 0.35 s: a core shared.
    assert spare.measure(3 * s, s * 13 // 10, s * 55 // 100) == pytest.approx(0.25)
    assert spare.info() == {"poll_spare_cores": 0.25, "poll_no_spare_core": 1}
    # Another: a niced task ran 0.9 s of it (a background build): spare, it yields.
    write_stat(stat, 1000 + s * 3 // 4 // tick, s // 4 // tick, s * 9 // 10 // tick)
    assert spare.measure(4 * s, s * 13 // 10, s * 55 // 100) == pytest.approx(0.9)
    nice[0] = 19                                  # a niced poll's run is in that column
    write_stat(stat, 1000 + s * 3 // 4 // tick, s // 4 // tick, s * 18 // 10 // tick)
    assert spare.measure(5 * s, s * 23 // 10, s * 55 // 100) == pytest.approx(0.9)
    stat.write_text("garbage\n")                  # unreadable: unknown, not "none spare"
    assert spare.measure(6 * s, 0, 0) is None
    spare.close()
    assert wait.SpareCores(str(tmp_path / "missing")).measure(0, 0, 0) is None


def test_poll_window_stays_shut_while_no_core_is_spare(monkeypatch):
    """A host with no core to spare (measured every SPARE_SAMPLE_NS): no window, however
    close the traps come, and a poll in progress stops; once a core is spare, it opens."""
    us, cores = 1000, [0.3]
    monkeypatch.setattr(wait.PollWindow, "_thread_times", lambda self: (0, 0))
    monkeypatch.setattr(wait.SpareCores, "measure", lambda self, now, on_cpu, delay: cores[0])
    window = PollWindow(0)
    now = 0
    for _ in range(5):                            # near misses: would grow the window
        now += 20 * us
        assert not window.found(now) and window.ns == 0
    cores[0] = 1.0                                # measured again only SPARE_SAMPLE_NS later
    start = now
    while not window.found(now := now + 20 * us):
        assert window.ns == 0
    assert now - start >= wait.SPARE_SAMPLE_NS - 100 * us and window.ns == window.start_ns
    assert not window.over(now + 1)
    cores[0] = 0.3                                # the next measure: a poll in progress stops
    assert window.over(now + wait.SPARE_SAMPLE_NS) and window.ns == 0


def test_detach_answers_what_was_posted_then_stub_stops_posting(page):
    stub, trap = page
    handler = Recorder()
    stub.begin(0, 0, VM0_DEV0, 4, True, 5)
    trap.detach(handler)
    assert stub.finish(0) == (abi.STATUS_OK, 0)
    assert stub.header.model_state == abi.MODEL_DETACHED and stub.header.model_pid == 0
    # Detached: the stub answers read-as-zero / write-ignored itself, nothing is posted.
    assert stub.post(0, 0, VM0_DEV0, 4, True, 6) == (abi.STATUS_UNHANDLED, 0)
    assert handler.calls == [(VM0_DEV0, 5, True, 4)]


def test_stub_withdraws_a_trap_posted_after_the_model_detached(page):
    """The stub read ATTACHED, then posted after the model's last scan."""
    stub, trap = page
    handler = Recorder()
    trap.detach(handler)
    stub.begin(1, 0, VM0_DEV0, 4, False)       # as if model_state was read just before
    assert stub.finish(1) == (abi.STATUS_UNHANDLED, 0)
    assert stub.region.read32(abi.SLOTS_OFFSET + abi.SLOT_SIZE) == abi.SLOT_FREE
    assert handler.calls == []


@pytest.mark.parametrize("is_write, value, answer", [(False, 0, 0x74726976),
                                                      (True, 5, 0)], ids=["read", "write"])
def test_a_stub_that_sees_detached_takes_the_answer_the_model_gave_first(page, is_write,
                                                                         value, answer):
    """The stub loaded POSTED; then the model's detach answers the slot (DONE) and
    publishes DETACHED; then the stub looks at model_state. It must take the answer (a
    read's value, a write done), not withdraw the slot: it used to write FREE over DONE
    and report UNHANDLED (read as zero, a write that took effect reported ignored)."""
    stub, trap = page
    handler = Recorder()
    handler.registers[VM0_DEV0] = 0x74726976
    stub.begin(0, 0, VM0_DEV0, 4, is_write, value)
    look = stub.model_detached

    def the_model_detaches_first():          # between the stub's loads of state and of
        if trap.slots:                       # model_state (once: detach empties slots)
            trap.detach(handler)
        return look()

    stub.model_detached = the_model_detaches_first
    assert stub.finish(0) == (abi.STATUS_OK, answer)
    assert stub.region.read32(abi.SLOTS_OFFSET) == abi.SLOT_FREE
    assert handler.calls == [(VM0_DEV0, value, is_write, 4)]


def test_a_new_model_serves_what_a_dead_one_left_posted(page):
    stub, trap = page
    stub.begin(2, 0, VM0_DEV0, 4, False)    # the old model dies before answering
    successor = TrapPage(stub.region, LAYOUT)
    successor.attach()
    successor.serve_until_idle(Recorder())
    assert stub.finish(2) == (abi.STATUS_OK, 0)


def test_pace_asks_only_the_slots_a_vm_posted_from_and_a_new_model_clears_it(page):
    """``TrapPage.pace`` (docs/trap-abi.md section 16): ``pace_us`` goes to the slots VM 1's
    vCPUs posted from, at most ``PACE_MAX_US``, never to VM 0's nor to a slot that never
    trapped; a model that attaches after one died paced, or one that detaches, leaves
    every vCPU free again."""
    stub, trap = page
    for vcpu, vm, window in ((0, 0, VM0_DEV0), (1, 1, VM1_DEV0), (2, 1, VM1_DEV0)):
        exchange(stub, trap, Recorder(), vcpu, vm, window, 4, False)
    trap.pace(1, 10 * abi.PACE_MAX_US)
    assert [s.pace_us for s in stub.slots] == [0, abi.PACE_MAX_US, abi.PACE_MAX_US, 0]
    trap.pace(0, 500)                           # slot 3 (vm_id 0 too) never trapped
    assert [s.pace_us for s in stub.slots] == [500, abi.PACE_MAX_US, abi.PACE_MAX_US, 0]
    successor = TrapPage(stub.region, LAYOUT)      # the first model died without detaching
    successor.attach()
    assert [s.pace_us for s in stub.slots] == [0, 0, 0, 0]
    successor.pace(1, 1000)
    successor.detach(Recorder())
    assert [s.pace_us for s in stub.slots] == [0, 0, 0, 0]


@pytest.fixture
def file_page(tmp_path):
    """A trap page in a file (the emulated board's kind), initialised by the stand-in stub."""
    path = tmp_path / "trap"
    path.write_bytes(bytes(abi.PAGE_SIZE))
    region = Region.map_file(path, abi.PAGE_SIZE)
    StubPage(region).initialise(slot_count=4)
    yield path, region
    region.close()


SERVING_MODEL = """
import sys
from avatar_hw.hw.region import Region
from avatar_hw.layout import Layout
from avatar_hw.trap import TrapPage
trap = TrapPage(Region.map_file(sys.argv[1], 4096), Layout(), lock=sys.argv[1])
trap.attach()
print(flush=True)
sys.stdin.read()
"""


def test_attach_refused_while_another_model_holds_the_page(file_page):
    path, region = file_page
    other = subprocess.Popen([sys.executable, "-c", SERVING_MODEL, str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        other.stdout.readline()                 # attached
        with pytest.raises(abi.AbiMismatch, match=f"PID {other.pid}.*lock on"):
            TrapPage(region, LAYOUT, lock=path).attach()
    finally:
        other.kill()
        other.wait()
        other.stdin.close()
        other.stdout.close()
    # it died holding the page: the lock went with it, the next model takes over
    successor = TrapPage(region, LAYOUT, lock=path)
    successor.attach()
    assert successor.header.model_pid == os.getpid()
    successor.detach(Recorder())
    TrapPage(region, LAYOUT, lock=path).attach()        # detaching released it too


def test_a_recycled_pid_of_an_avatar_named_process_does_not_block_attach(file_page):
    path, region = file_page
    other = subprocess.Popen([sys.executable, "-c", "print(); import time; time.sleep(30)",
                              "avatar-hw"], stdout=subprocess.PIPE)
    try:
        other.stdout.readline()
        header = abi.Header.from_buffer(region.view(0, abi.SLOTS_OFFSET))
        header.model_pid = other.pid            # a dead model's PID, now someone else's
        region.store_release32(abi.MODEL_STATE_OFFSET, abi.MODEL_ATTACHED)
        trap = TrapPage(region, LAYOUT, lock=path)
        trap.attach()
        assert trap.header.model_pid == os.getpid()
        del header
        trap.release_lock()
    finally:
        other.kill()
        other.wait()
        other.stdout.close()


def test_service_after_detach_does_not_touch_the_page(page):
    stub, trap = page
    trap.detach(Recorder())
    before = bytes(stub.region.view(0, abi.PAGE_SIZE))
    assert trap.serve_until_idle(Recorder()) == 0            # a late doorbell event
    assert bytes(stub.region.view(0, abi.PAGE_SIZE)) == before


def test_service_returns_to_the_loop_while_vcpus_keep_posting(page):
    """Busy vCPUs post again as soon as they are answered: service must come back."""
    stub, trap = page
    calls = []

    def handler(window, offset, value, is_write, size):
        calls.append(address(window, offset))
        assert len(calls) < 10 * MAX_TRAPS_PER_CALL, "service never returned"
        return True, 0

    def repost(*_):
        for vcpu in range(4):
            if stub.region.load_acquire32(abi.SLOTS_OFFSET + vcpu * abi.SLOT_SIZE
                                          + abi.STATE_OFFSET) == abi.SLOT_DONE:
                stub.finish(vcpu)
                stub.begin(vcpu, 0, VM0_DEV0, 4, False)
        return handler(*_)

    for vcpu in range(4):
        stub.begin(vcpu, 0, VM0_DEV0, 4, False)
    served = trap.serve_until_idle(repost)
    assert MAX_TRAPS_PER_CALL <= served < MAX_TRAPS_PER_CALL + 4
    assert trap.stopped_at_budget and stub.header.model_sleeping == 0   # the stub need not ring
    assert trap.serve_until_idle(Recorder()) <= 4 and not trap.stopped_at_budget  # vCPUs stop
    for vcpu in range(4):
        assert stub.finish(vcpu) == (abi.STATUS_OK, 0)
    assert stub.header.model_sleeping == 1


def test_not_ready_bad_magic_and_major_are_refused_with_one_line():
    region = Region(bytearray(abi.PAGE_SIZE), name="/dev/uio0")
    with pytest.raises(StubNotReady, match="has not initialised"):
        TrapPage(region, LAYOUT).wait_ready(0.05)
    StubPage(region).initialise(1, magic=0x12345678)
    with pytest.raises(abi.AbiMismatch, match="magic 0x12345678"):
        TrapPage(region, LAYOUT).wait_ready(0)
    StubPage(region).initialise(1, major=2, minor=0)
    with pytest.raises(abi.AbiMismatch, match="trap ABI 2.0") as err:
        TrapPage(region, LAYOUT).wait_ready(0)
    assert "\n" not in str(err.value)


def test_newer_minor_is_accepted():
    region = Region(bytearray(abi.PAGE_SIZE))
    StubPage(region).initialise(1, minor=abi.ABI_MINOR + 3)
    TrapPage(region, LAYOUT).attach()


def test_trace_reports_every_trap(page):
    stub, trap = page
    seen = []
    trap.trace = lambda *record: seen.append(record)
    exchange(stub, trap, Recorder(), 1, 0, VM0_DEV0 + 0x70, 4, True, 3)
    vm, vcpu, gpa, size, is_write, value, status, latency, window, offset = seen[0]
    assert (vm, vcpu, gpa, size, is_write, value, status) == (0, 1, VM0_DEV0 + 0x70, 4, True,
                                                              3, abi.STATUS_OK)
    assert latency >= 0
    assert (window, offset) == (LAYOUT.window_number(0, 0), 0x70)   # decoded once, passed on


def test_many_traps_from_concurrent_vcpus_are_each_answered_once(page):
    """Four stub threads (vCPUs) post while the model serves: every write lands once."""
    stub, trap = page
    handler = Recorder()
    done = []

    def vcpu(n):
        try:
            for i in range(300):
                assert stub.post(n, 0, VM0_DEV0 + 0x100 + 4 * n, 4, True, i) == (0, 0)
        finally:
            done.append(n)

    threads = [threading.Thread(target=vcpu, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    while len(done) < 4:
        trap.serve_until_idle(handler)
    for t in threads:
        t.join()
    writes = [c for c in handler.calls if c[2]]
    assert len(writes) == 1200
    for n in range(4):
        assert [c[1] for c in writes if c[0] == VM0_DEV0 + 0x100 + 4 * n] == list(range(300))


def test_a_posted_write_is_served_before_the_vcpus_next_trap(page):
    """Section 7's ordering: the vCPU's next access is posted only once the model freed
    the slot of its posted write, so the model sees them in program order."""
    stub, trap = page
    handler = Recorder()
    stub.begin(0, 0, VM0_DEV0 + 0x64, 4, True, 3, posted=True)       # InterruptACK, posted
    answers = []
    reader = threading.Thread(target=lambda: answers.append(
        stub.post(0, 0, VM0_DEV0 + 0x64, 4, False, timeout=30)))
    reader.start()
    reader.join(0.05)
    slot = stub.slots[0]
    assert (slot.direction, slot.flags) == (abi.DIR_WRITE, abi.SLOT_F_POSTED_WRITE)
    while reader.is_alive():
        trap.serve_until_idle(handler)
    assert handler.calls == [(VM0_DEV0 + 0x64, 3, True, 4), (VM0_DEV0 + 0x64, 0, False, 4)]
    assert answers == [(abi.STATUS_OK, 3)]
    assert trap.stats.posted_writes == 1 and trap.stats.served == 2


def test_a_posted_interrupt_ack_is_served_before_a_new_interrupt_status_bit():
    """The guest posts InterruptACK, then reads the used ring; the device adds a used
    buffer before the model saw the ACK. Served late, the ACK would clear the new bit
    and the guest, interrupted, would read InterruptStatus 0 and miss the buffer."""
    from avatar_hw.testing.virtio import IrqRecorder, RecordingDevice, VirtioBench
    from avatar_hw.virtio import constants as c
    from avatar_hw.virtio.subsystem import Subsystem

    region = Region(bytearray(abi.PAGE_SIZE))
    stub = StubPage(region)
    stub.initialise(slot_count=1)
    trap = TrapPage(region, LAYOUT)
    trap.attach()
    irq = IrqRecorder()
    subsystem = Subsystem(interrupt_line=irq,
                          before_interrupt=lambda: trap.serve_posted_writes(subsystem.dispatch,
                                                                           c.REG_INTERRUPT_ACK))
    bench = VirtioBench(RecordingDevice(), subsystem=subsystem, irq=irq)
    context = bench.transport.context
    context.interrupt(c.INT_USED_BUFFER)                           # first buffer: interrupt
    assert irq.take() == [bench.transport.intid]
    ack = bench.transport.window + c.REG_INTERRUPT_ACK
    stub.begin(0, 0, ack, 4, True, c.INT_USED_BUFFER, posted=True)  # not served yet
    context.interrupt(c.INT_USED_BUFFER)                           # second buffer
    trap.serve_until_idle(subsystem.dispatch)
    assert context.interrupt_status == c.INT_USED_BUFFER
    assert irq.take() == [bench.transport.intid]
    assert trap.stats.posted_writes == 1


def test_a_slot_served_by_a_nested_call_during_a_scan_is_not_served_again(page):
    """A scan reads every state first; a posted InterruptACK that the interrupt rule serves
    from inside another slot's dispatch (serve_posted_writes) is then already FREE: the
    scan must skip it, not answer a slot the stub may be filling again."""
    stub, trap = page
    calls = []

    def handler(window, offset, value, is_write, size):
        calls.append((address(window, offset), value))
        if offset == 0x50:                   # the notify raises an interrupt: ACKs first
            trap.serve_posted_writes(handler, 0x64)
        return True, 0

    stub.begin(0, 0, VM0_DEV0 + 0x50, 4, True, 1)                      # QueueNotify, waited
    stub.begin(1, 0, VM0_DEV0 + 0x64, 4, True, 1, posted=True)         # InterruptACK, posted
    assert trap.scan_once(handler) == 1
    assert calls == [(VM0_DEV0 + 0x50, 1), (VM0_DEV0 + 0x64, 1)]
    assert stub.finish(0) == (abi.STATUS_OK, 0)
    assert trap.stats.served == 2 and trap.stats.posted_writes == 1


# -- fairness between VMs (trap.py module docstring) -------------------------------------------

VM0_SLOT, VM1_SLOTS = 3, (0, 1, 2)      # VM 1 has three vCPUs, VM 0 one


class Ticks:
    """A clock for the service-time accounts: every trap takes 1000 "ns"."""

    def __init__(self):
        self.now = 0

    def __call__(self):
        self.now += 1000
        return self.now


@pytest.fixture
def fair_page():
    region = Region(bytearray(abi.PAGE_SIZE), name="test trap page")
    stub = StubPage(region)
    stub.initialise(slot_count=4)
    trap = TrapPage(region, LAYOUT, clock=Ticks())
    trap.attach()
    return stub, trap


def post(stub, vcpu):
    """A posted QueueNotify of the vCPU's VM (slot ``vcpu``), as a flooding driver makes."""
    vm = 0 if vcpu == VM0_SLOT else 1
    stub.begin(vcpu, vm, LAYOUT.window(vm, 0) + 0x50, 4, True, 0, posted=True)


def slot_free(stub, vcpu):
    return stub.region.read32(abi.SLOTS_OFFSET + vcpu * abi.SLOT_SIZE) == abi.SLOT_FREE


def vm_of(call):
    return (call[0] - LAYOUT.base) // LAYOUT.vm_size


def test_a_vm_above_its_share_is_served_after_the_others(fair_page):
    stub, trap = fair_page
    handler = Recorder()
    for _ in range(10):                     # VM 1 alone: the daemon's time is all VM 1's
        for vcpu in VM1_SLOTS:
            post(stub, vcpu)
        trap.serve_until_idle(handler)
    handler.calls.clear()
    for vcpu in (*VM1_SLOTS, VM0_SLOT):
        post(stub, vcpu)
    trap.serve_until_idle(handler)
    assert [vm_of(call) for call in handler.calls] == [0, 1, 1, 1]
    assert trap.vm_deferred == [0, 3] + [0] * (LAYOUT.max_vms - 2)
    assert trap.vm_counters(0) == {"traps_served": 1, "service_ms": 0.001, "traps_deferred": 0,
                                   "traps_unhandled": 0, "wfi_caught": 0, "wfi_ran_out": 0,
                                   "wfi_slept": 0}
    assert trap.vm_counters(1)["traps_served"] == 33
    assert all(slot_free(stub, vcpu) for vcpu in range(4))


def test_the_accounts_halve_once_for_each_window_passed(fair_page):
    """A flood long past is forgotten: 33 traps halved once per FAIR_WINDOW_NS (ten windows
    later: 0), not once for the whole pause, so VM 1 is not put off any more."""
    stub, trap = fair_page
    handler = Recorder()
    for _ in range(11):
        for vcpu in VM1_SLOTS:
            post(stub, vcpu)
        trap.serve_until_idle(handler)
    trap.clock.now += 10 * FAIR_WINDOW_NS
    for vcpu in (*VM1_SLOTS, VM0_SLOT):
        post(stub, vcpu)
    trap.serve_until_idle(handler)
    assert trap.vm_deferred == [0] * LAYOUT.max_vms
    assert trap.vm_counters(1)["traps_served"] == 36


def test_a_flooding_vm_delays_another_vms_trap_by_at_most_the_rest_of_one_pass(fair_page):
    """VM 1 re-posts each of its vCPUs' notifies as soon as the slot is free; VM 0 posts
    one trap in the middle: it waits only for the VM 1 slots of the pass under way."""
    stub, trap = fair_page
    handler = Recorder()
    flood = {"left": 300}

    def flooding(window, offset, value, is_write, size):
        handler(window, offset, value, is_write, size)
        vm1_calls = sum(vm_of(call) == 1 for call in handler.calls)
        if vm1_calls == 100:
            post(stub, VM0_SLOT)
            flooding.vm0_posted_at = len(handler.calls)
        for vcpu in VM1_SLOTS:
            if flood["left"] and slot_free(stub, vcpu):
                post(stub, vcpu)
                flood["left"] -= 1
        return True, 0

    for vcpu in VM1_SLOTS:
        post(stub, vcpu)
    while not all(slot_free(stub, vcpu) for vcpu in range(4)):
        trap.serve_until_idle(flooding)
    vm0_served_at = [vm_of(call) for call in handler.calls].index(0)
    # The pass under way serves its other VM 1 slots (at most two); the next serves VM 0
    # first, VM 1 being above its share (in index order it would come after 0, 1, 2).
    assert vm0_served_at - flooding.vm0_posted_at <= len(VM1_SLOTS) - 1
    assert trap.vm_deferred[1] >= 1
    assert [trap.vm_counters(vm)["traps_served"] for vm in (0, 1)] == [1, 303]


def test_a_vm_above_its_share_is_put_off_at_most_once_in_a_row(fair_page):
    """VM 0's two vCPUs keep one trap posted all the time; VM 1, which made many more traps
    before (it stays above its share), is still served: put off one pass, then served."""
    stub, trap = fair_page
    handler = Recorder()
    for _ in range(1000):
        post(stub, 0)
        trap.serve_until_idle(handler)
    vm0_slots = (2, VM0_SLOT)
    stub.slots[2].vm_id = 0                 # (post() derives the VM from the slot)
    left = {"vm0": 400, "vm1": 50}

    def busy(window, offset, value, is_write, size):
        handler(window, offset, value, is_write, size)
        for vcpu in vm0_slots:
            if left["vm0"] and slot_free(stub, vcpu):
                stub.begin(vcpu, 0, VM0_DEV0 + 0x50, 4, True, 0, posted=True)
                left["vm0"] -= 1
        if left["vm1"] and slot_free(stub, 0):
            post(stub, 0)
            left["vm1"] -= 1
        return True, 0

    stub.begin(VM0_SLOT, 0, VM0_DEV0 + 0x50, 4, True, 0, posted=True)
    post(stub, 0)
    while not all(slot_free(stub, vcpu) for vcpu in range(4)):
        trap.serve_until_idle(busy)
    order = [vm_of(call) for call in handler.calls[1000:]]
    assert left == {"vm0": 0, "vm1": 0}
    assert order.count(1) == 51
    # Between two VM 1 traps, VM 0's two vCPUs are served at most twice each (one pass put
    # off, then the pass serving VM 1 too).
    runs = "".join(map(str, order)).split("1")
    assert max(len(run) for run in runs[1:-1]) <= 4
    assert 0 < trap.vm_deferred[1] <= 51


def test_the_fair_order_allocates_nothing_per_pass(fair_page):
    """Its per-VM scratch is made once: a pass over slots of two VMs builds no dict or
    list (either alone would take more than 100 bytes; iterators and the clock's ints take
    less)."""
    stub, trap = fair_page
    for _ in range(10):                     # VM 1 above its share
        for vcpu in VM1_SLOTS:
            post(stub, vcpu)
        trap.serve_until_idle(Recorder())
    for vcpu in (*VM1_SLOTS, VM0_SLOT):
        post(stub, vcpu)
    trap._put_off(0b1111)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(100):
            trap._put_off(0b1111)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - before < 200
    assert trap.vm_deferred[1] > 0               # the passes did put VM 1's slots off


def test_detach_answers_slots_the_fair_order_would_put_off(fair_page):
    stub, trap = fair_page
    handler = Recorder()
    for _ in range(5):
        post(stub, 0)
        trap.serve_until_idle(handler)
    post(stub, 0)
    post(stub, VM0_SLOT)
    trap.detach(handler)
    assert all(slot_free(stub, vcpu) for vcpu in range(4))


def test_a_paced_vm_is_served_after_a_vm_that_is_not_even_below_its_share(fair_page):
    """VM 0 made many traps (a correct driver moving data), VM 1, paced, few: by the
    accounts VM 0 would be put off. Paced, VM 1 goes after it instead, put off at most
    once in a row like any slot; when both are paced, or neither, the accounts decide."""
    stub, trap = fair_page
    trap.features |= abi.F_PACE
    handler = Recorder()
    for _ in range(30):                     # VM 0's account
        post(stub, VM0_SLOT)
        trap.serve_until_idle(handler)
    post(stub, 0)
    trap.serve_until_idle(handler)          # VM 1 trapped once: its slot is VM 1's

    def order(paced):
        for vm in (0, 1):
            trap.pace(vm, 1000 if vm in paced else 0)
        handler.calls.clear()
        post(stub, 0)
        post(stub, VM0_SLOT)
        trap.serve_until_idle(handler)
        return [vm_of(call) for call in handler.calls]

    assert order(paced={1}) == [0, 1]
    assert trap.vm_deferred[:2] == [0, 1]
    assert order(paced={0, 1}) == [1, 0]    # VM 0 above its share
    assert order(paced=()) == [1, 0]
    assert trap.vm_paced == [False] * LAYOUT.max_vms
