"""The model side of the trap page (docs/trap-abi.md).

``TrapPage`` validates the page the stub initialised, attaches (announcing the
features it accepts), answers posted slots and detaches on a clean exit. One
verb per step: ``serve_until_idle`` (the doorbell's callback) calls
``scan_once`` (one pass over the slots), which calls ``complete_slot`` for each
POSTED one: it decodes the address once, with tables made from the layout, to
a *window number* (``Layout.window_number``) and an offset in that window,
calls ``dispatch(window, offset, value, is_write, size) -> (handled, value)``
(``Subsystem.dispatch``) and publishes the answer. The slot and header views are ctypes structures
made once over the mapping, so serving a trap allocates no views; a slot's request (address,
value, size, direction, flags, VM, vCPU) is read with one ``struct`` copy instead of seven
field loads, and an aligned 4-byte access in its VM's window is decoded inline. A scan reads
every slot's ``state`` with a plain load and, only if one is POSTED, orders them
before the slots' fields with one acquire fence (a load-acquire of each: LDR then
DMB ISH on arm64, libatomic's fence for any order, where DMB ISHLD would do); an
answer is published with a release fence and a plain store of ``state`` (DMB ISH,
STR). On x86 (TSO) both fences are no instruction, and an idle scan costs no
foreign call at all.

Fairness between VMs: every answered trap is counted, with its service time
(from the previous answer of its pass, or the pass's start, to its state written:
dispatch included), in the counts of the window it decoded to (``waited`` or ``posted``,
``service_ns``), whose sums over a VM's windows are its own (``vm_counters``: ``avatar-hw
info``). The traps since the last halving are the VM's
recent account, halved once for each ``FAIR_WINDOW_NS`` (50 ms) passed since (looked
at in a pass that may put a slot off). A pass whose posted slots belong to
several VMs puts off the slots of a VM whose recent account is above its share
(the accounts of those VMs divided by their number) to the next pass, so a VM
that floods the daemon with traps (notifies, register writes, guest errors) is
served after the others; its vCPU waits meanwhile (its own cost). Traps, not
service time: a driver moving data makes few traps, each carrying much (a 1 MiB
block request costs the daemon ~30 times a refused register write), while each
trap costs the host a world switch and often a doorbell ring whatever it
carries. A slot is put off at most once in a row, and only in a pass that serves
another VM's slot: no VM is starved and the daemon is never held
(``vm_deferred`` counts them). A paced VM (``pace``, avatar_hw/pace.py) has few
recent traps, being paced, so its slots would be served before those of a busy correct
VM: while it is paced they go after those of every VM that is not. With one slot per
vCPU a scan already serves each vCPU at most once per pass; the share also stops a VM
with more vCPUs from getting more turns per pass than another (docs/devices.md,
"Hostile guests").

A slot whose fields make no sense (a size of 3, an unknown direction, an
address outside the VM's own virtio window) is answered UNHANDLED with a
warning, and an exception from ``dispatch`` is logged and answered UNHANDLED
too: nothing posted can stop the daemon. Both are counted (``malformed``,
``handler_errors``) and their lines rate-limited: a guest can repeat them.
"""

import fcntl
import logging
import os
import struct
import time

from . import abi
from .errors import AvatarError
from .hw import ordering
from .hw.ordering import WEAKLY_ORDERED
from .ratelimit import RateLimitedLog
from .shadow import RegisterShadows
from .wait import ADAPTIVE, BUSY_POLL, DOORBELL, PollWindow

log = logging.getLogger(__name__)

# the widths a trapped access may have, and the mask of each
ACCESS_MASKS = {size: (1 << (8 * size)) - 1 for size in (1, 2, 4, 8)}
MAX_TRAPS_PER_CALL = 256     # then back to the event loop (``stopped_at_budget`` says come back)
POLL_IDLE_SCANS = 64         # polling: idle scans per call before the event loop's turn
POLL_CHECK_SCANS = 8         # adaptive: idle scans between two looks at its window
FAIR_WINDOW_NS = 50_000_000  # the VMs' recent trap accounts halve at most this often
# A slot's request, gpa to vcpu_id, read with one copy after the scan's acquire fence: the
# stub wrote it before its release of ``state`` and leaves it alone while the slot is
# POSTED, and the page is Normal memory (docs/board-setup.md), so a copy reads what the
# field loads would.
_REQUEST = struct.Struct("<QQBBBBHH")
assert abi.Slot.gpa.offset + _REQUEST.size == abi.Slot.t_post.offset


class StubNotReady(abi.AbiMismatch):
    """The stub has not (yet) initialised the trap page."""


class TrapStats:
    """Counters for ``avatar-hw info``. ``served`` and ``posted_writes`` are the sums of the
    page's per-window counts (``TrapPage.waited``, ``TrapPage.posted``): a trap is counted
    once, in its window's entry."""

    def __init__(self, waited, posted):
        self._waited, self._posted = waited, posted
        self.unhandled = 0
        self.malformed = 0
        self.handler_errors = 0

    @property
    def served(self):
        return sum(self._waited) + sum(self._posted)

    @property
    def posted_writes(self):
        """Of ``served``: the guest did not wait for these."""
        return sum(self._posted)

    def as_dict(self):
        return {"served": self.served, "unhandled": self.unhandled, "malformed": self.malformed,
                "posted_writes": self.posted_writes, "handler_errors": self.handler_errors}


class TrapPage:
    """The trap page in ``region`` (at least ``abi.PAGE_SIZE`` bytes), for a ``layout``.

    ``trace``, if given, is called after every answered trap as
    ``trace(vm_id, vcpu_id, gpa, size, is_write, value, status, latency_ns, window,
    offset)``; ``latency_ns`` is the model's service time (module docstring);
    ``window`` is the decoded window number, -1 when none was.

    ``lock``: the path of the trap page's file or device node; the attached
    model holds an exclusive ``flock`` on it (released when it detaches or
    dies), so a second model is refused while the first one serves.

    ``clock``: monotonic nanoseconds for the service-time accounts, the trace's
    ``latency_ns`` and the adaptive mode's window (``time.monotonic_ns``; tests hand in a
    counter).
    """

    def __init__(self, region, layout, *, trace=None, lock=None, clock=time.monotonic_ns):
        if region.size < abi.PAGE_SIZE:
            raise abi.AbiMismatch(f"{region.name}: trap page is {region.size} bytes, "
                                  f"expected at least {abi.PAGE_SIZE}")
        self.region = region
        self.layout = layout
        self.trace = trace
        self.header = abi.Header.from_buffer(region.view(0, abi.SLOTS_OFFSET))
        self.features = 0
        self.shadows = None             # RegisterShadows when AVT_F_REGISTER_SHADOW is in force
        self.wait = DOORBELL            # how the model waits for traps (avatar_hw.wait)
        self.polling = False            # scanning with model_sleeping clear, doorbell not armed
        self.window = None              # PollWindow in the adaptive mode
        self.slots = ()
        self._slot_bits = ()            # (1 << i, slot i): what a scan walks
        self._page = None               # the page, for ``_REQUEST`` (with the slot views)
        self._request_offsets = ()      # slot i's request in it
        self._warn = RateLimitedLog(log, first=10)
        # A device bug a guest's accesses reach can be repeated at trap rate: counted in
        # ``stats.handler_errors``, its tracebacks rate-limited like the guest's lines.
        self._handler_error_log = RateLimitedLog(log, first=10, level=logging.ERROR)
        self.lock_path = lock
        self._lock_fd = None
        self.stopped_at_budget = False
        self._in_service = 0            # bit i: slot i is being completed (re-entrancy guard)
        self._completed = 0             # bit i: slot i was completed (since a scan began)
        # The window decoding, made once: window number -> owning VM (None: no device slot
        # there) and -> base address; a trap is decoded with one subtraction and one division.
        self._layout_base, self._device_size = layout.base, layout.device_size
        self._layout_span = layout.window_count * layout.device_size
        per_vm = layout.windows_per_vm
        self._window_vms = tuple(w // per_vm if w % per_vm < layout.devices_per_vm else None
                                 for w in range(layout.window_count))
        self._window_bases = tuple(layout.base + w * layout.device_size
                                   for w in range(layout.window_count))
        # Per window number: traps the guest waited for, posted writes (it did not) and
        # their service time; the last entry (window -1) takes the traps decoded to no
        # window. A VM's traps are the sums over its windows (``vm_traps``).
        self.waited = [0] * (layout.window_count + 1)
        self.posted = [0] * (layout.window_count + 1)
        self.service_ns = [0] * (layout.window_count + 1)
        self.stats = TrapStats(self.waited, self.posted)
        self._vm_windows = tuple(range(vm * per_vm, vm * per_vm + layout.devices_per_vm)
                                 for vm in range(layout.max_vms))
        # Per VM: its slots put off by the fair order; its recent account is
        # vm_traps(vm) - _account_base[vm], halved as of _halved_at[vm] (module docstring).
        self.clock = clock
        self.vm_deferred = [0] * layout.max_vms
        # Per VM: its accesses answered UNHANDLED (malformed, or no device at the address):
        # idle traps that no device counts (avatar_hw/pace.py).
        self.vm_unhandled = [0] * layout.max_vms
        self.vm_paced = [False] * layout.max_vms        # ``pace``: its accesses wait
        self._account_base = [0] * layout.max_vms
        self._lap = clock()             # when the last answer was written (``complete_slot``)
        self._halved_at = [self._lap] * layout.max_vms
        self._deferred = 0              # bit i: slot i was put off by the last pass
        # The fair order's scratch, made once (nothing allocated per pass): per VM, its
        # recent account and the bits of its slots posted in this pass; the last entry of
        # ``_posted_by_vm`` takes the slots naming no VM of the layout.
        self._recent = [0] * layout.max_vms
        self._posted_by_vm = [0] * (layout.max_vms + 1)

    # -- attach / detach ----------------------------------------------------------

    def stub_ready(self):
        return self.region.load_acquire32(abi.STUB_STATE_OFFSET) == abi.STUB_READY

    def wait_ready(self, timeout, stopping=lambda: False):
        """Wait up to ``timeout`` seconds for the stub to finish initialising the page; False
        when ``stopping()`` (asked every 10 ms) came true first."""
        deadline = time.monotonic() + timeout
        while not self.stub_ready():
            if stopping():
                return False
            if time.monotonic() >= deadline:
                raise StubNotReady(
                    f"{self.region.name}: the hypervisor stub has not initialised the trap page "
                    f"(stub_state is not READY after {timeout:g} s): start the hypervisor (or the "
                    f"emulated board) first, or check the trap UIO name in the board file")
            time.sleep(0.01)
        abi.check_header(self.header, where=self.region.name)
        self._make_slot_views()
        return True

    def _make_slot_views(self):
        count = self.header.slot_count
        self.slots = tuple(
            abi.Slot.from_buffer(self.region.view(abi.SLOTS_OFFSET + i * abi.SLOT_SIZE,
                                                  abi.SLOT_SIZE))
            for i in range(count))
        self._slot_bits = tuple((1 << i, slot) for i, slot in enumerate(self.slots))
        self._page = self.region.view(0, abi.PAGE_SIZE)
        self._request_offsets = tuple(abi.SLOTS_OFFSET + i * abi.SLOT_SIZE + abi.Slot.gpa.offset
                                      for i in range(count))

    def attach(self, *, wanted=abi.SUPPORTED_FEATURES, wait=DOORBELL):
        """Accept ``wanted & stub_features`` and publish ATTACHED (store-release); ``wait``:
        how ``serve_until_idle`` waits for traps (``avatar_hw.wait``).

        Refuses when another model holds the page's lock (``lock``). Slots left
        POSTED by a model that died are served by the next ``serve_until_idle``.
        """
        if not self.slots:
            self.wait_ready(0)
        header = self.header
        self.take_lock()
        if header.model_state == abi.MODEL_ATTACHED:
            log.info("taking over the trap page from PID %d, which is gone", header.model_pid)
        self.features = header.stub_features & wanted
        self.shadows = None
        if self.features & abi.F_REGISTER_SHADOW:
            self.shadows = self._shadow_pages()
        if self.shadows is None:        # the stub takes acknowledgements only with shadows
            self.features &= ~(abi.F_REGISTER_SHADOW | abi.F_STUB_ACK)
        else:
            self.shadows.clear()        # nothing a previous model left is answered
        self.wait = wait
        self.polling = wait == BUSY_POLL
        self.window = PollWindow(self.clock()) if wait == ADAPTIVE else None
        self._clear_paces()             # a VM a previous model paced runs freely again
        header.model_features = self.features
        header.model_pid = os.getpid()
        header.model_sleeping = 0 if self.polling else 1
        self.region.store_release32(abi.MODEL_STATE_OFFSET, abi.MODEL_ATTACHED)
        log.info("attached to %s: ABI %d.%d, %d slots, features 0x%x (stub offers 0x%x)",
                 self.region.name, header.abi_major, header.abi_minor, len(self.slots),
                 self.features, header.stub_features)

    def _shadow_pages(self):
        """The stub's register shadow pages in this mapping, or None (logged) when the
        header's ``shadow_offset``/``shadow_count`` do not fit it."""
        offset, count = self.header.shadow_offset, self.header.shadow_count
        end = offset + count * abi.SHADOW_PAGE_SIZE
        if offset < abi.PAGE_SIZE or offset % abi.SHADOW_PAGE_SIZE or not count \
                or end > self.region.size:
            log.warning("%s: the stub offers register shadows at offset 0x%x (%d pages) "
                        "outside the %d-byte trap region: reads trap instead (map the shadow "
                        "pages with the trap page in the board file)", self.region.name,
                        offset, count, self.region.size)
            return None
        return RegisterShadows(self.region, offset, count,
                               stub_ack=bool(self.features & abi.F_STUB_ACK))

    def detach(self, dispatch):
        """Answer what is posted, then publish DETACHED (store-release) and let go.

        After DETACHED the model never touches a slot again: a trap the stub
        posts later (it read ATTACHED just before) is withdrawn by the stub
        when it sees DETACHED (docs/trap-abi.md, "Attach and detach").
        """
        self.scan_once(dispatch, fair=False)
        self._clear_paces()
        self.header.model_sleeping = 0
        self.header.model_pid = 0
        self.region.store_release32(abi.MODEL_STATE_OFFSET, abi.MODEL_DETACHED)
        self.slots, self._slot_bits, self._page = (), (), None
        self.shadows = None
        if self.window is not None:
            self.window.close()
        self.release_lock()
        log.info("detached from %s", self.region.name)

    def take_lock(self):
        """Hold the page's lock (``attach`` takes it if not yet held; the daemon takes it
        before it drops privileges, which may leave it unable to open ``lock``)."""
        if self.lock_path is None or self._lock_fd is not None:
            return
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise AvatarError(f"{self.lock_path}: cannot open the trap page's lock: "
                                  f"{err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise abi.AbiMismatch(
                f"{self.region.name}: already served by avatar-hw PID {self.header.model_pid} "
                f"(it holds the lock on {self.lock_path}): stop that daemon first (one model "
                f"per trap page)") from None
        self._lock_fd = fd

    def release_lock(self):
        """Let another model attach (also happens when this process dies)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self):
        """Release the lock and drop the views into the region, which may be unmapped next."""
        self.release_lock()
        self.header = self._page = self.shadows = None
        self.slots = self._slot_bits = ()

    # -- serving --------------------------------------------------------------------

    def serve_until_idle(self, dispatch):
        """Answer every posted slot, then arm the doorbell unless polling.

        Before the caller blocks, ``model_sleeping`` is set, a full fence
        orders it before the re-scan, and slots posted meanwhile are served:
        the stub posts, fences and reads ``model_sleeping``, so either it
        rings or this re-scan sees its slot (docs/trap-abi.md, "Notification").
        Polling (``polling``: always in busy-poll, within the window in the
        adaptive mode), ``model_sleeping`` stays clear and it returns after
        ``POLL_IDLE_SCANS`` scans in a row found nothing (the caller polls its
        other events in between, so a scan costs no system call); adaptive, once
        the window has passed with nothing found (or another task wanted this CPU:
        ``PollWindow.over``, asked every ``POLL_CHECK_SCANS`` idle scans), it stops
        polling and arms.

        At most about ``MAX_TRAPS_PER_CALL`` traps per call: when more were
        posted, ``stopped_at_budget`` is True, ``model_sleeping`` stays clear
        (the stub does not ring) and the caller calls again after its other
        events. Detached: does nothing (the page is not ours any more).
        """
        self.stopped_at_budget = False
        if not self.slots:
            return 0
        header, window = self.header, self.window
        total = 0
        while True:
            header.model_sleeping = 0
            idle = 0
            while True:
                served = self.scan_once(dispatch)
                if served:
                    total += served
                    if window is not None:      # when the last answer was written
                        self.polling = window.found(self._lap)
                    if total >= MAX_TRAPS_PER_CALL:
                        self.stopped_at_budget = True
                        return total
                    idle = 0
                elif not self.polling:
                    break
                else:
                    idle += 1
                    if (window is not None and not idle % POLL_CHECK_SCANS
                            and window.over(self.clock())):
                        self.polling = False
                        break
                    if idle >= POLL_IDLE_SCANS:
                        return total
            header.model_sleeping = 1
            ordering.fence()
            if not self.any_posted():
                return total

    def any_posted(self):
        for _, slot in self._slot_bits:
            if slot.state == abi.SLOT_POSTED:
                return True
        return False

    def scan_once(self, dispatch, fair=True):
        """One pass over the slots, completing each POSTED one; returns how many.

        Plain loads of every ``state``, then one acquire fence if any was POSTED
        (module docstring). A slot a nested call completed meanwhile (a posted
        InterruptACK served before an interrupt, ``serve_posted_writes``) is
        skipped: if the stub posted it again, the next scan serves it. When
        several slots are POSTED, ``fair`` (not on detach) puts off those of a
        VM above its share (``_put_off``) to the next pass.
        """
        posted = 0
        for bit, slot in self._slot_bits:
            if slot.state == abi.SLOT_POSTED:
                posted |= bit
        if not posted:
            return 0
        if WEAKLY_ORDERED:
            ordering.acquire_fence()
        if fair and posted & (posted - 1):
            posted &= ~self._put_off(posted)
        elif self._deferred:
            self._deferred = 0
        self._lap = self.clock()
        self._completed = 0
        served = 0
        index = 0
        while posted:
            if posted & 1 and not self._completed >> index & 1:
                self.complete_slot(index, dispatch)
                served += 1
            posted >>= 1
            index += 1
        return served

    def _put_off(self, posted):
        """The slots of ``posted`` (two or more) this pass leaves to the next: those of
        VMs above their share of the recent traps, or paced beside one that is not,
        unless the last pass put them off already. Another VM's slot is always served in
        this pass. A slot naming no VM of the layout (answered UNHANDLED) is never put off;
        such slots count as one more VM among those posting. Allocates nothing (per-VM
        lists made once)."""
        by_vm = self._posted_by_vm
        none = len(by_vm) - 1           # by_vm's entry for slots naming no VM
        owners = 0                      # bit v: VM v (or ``none``) posted in this pass
        for bit, slot in self._slot_bits:
            if posted & bit:
                vm = slot.vm_id
                if vm >= none:
                    vm = none
                owners |= 1 << vm
                by_vm[vm] |= bit
        put_off = 0
        if owners & (owners - 1):
            recent = self._update_recent(owners)
            count = owners.bit_count()
            # A paced VM goes after the VMs that are not (``pace``), which share among
            # themselves: being paced, its account is small, and it must not put a VM
            # that is not paced after it. Paced VMs alone share as usual.
            paced, slow = self.vm_paced, 0
            for vm in range(none):
                if by_vm[vm] and paced[vm]:
                    slow += 1
            if slow == count:
                slow = 0
            count -= slow
            total = 0
            for vm in range(none):
                if by_vm[vm] and not (slow and paced[vm]):
                    total += recent[vm]
            for vm in range(none):
                bits = by_vm[vm]
                if bits and ((slow and paced[vm]) or recent[vm] * count > total):
                    bits &= ~self._deferred
                    if bits:
                        put_off |= bits
                        self.vm_deferred[vm] += bits.bit_count()
        vm = 0
        while owners:                   # by_vm cleared where this pass set it
            if owners & 1:
                by_vm[vm] = 0
            owners >>= 1
            vm += 1
        self._deferred = put_off
        return put_off

    def serve_posted_writes(self, dispatch, offset):
        """Serve every posted write to window ``offset`` now; returns how many.

        The model calls this for InterruptACK before it sets an InterruptStatus bit
        (``Subsystem(before_interrupt=...)``), so that a posted InterruptACK
        the guest wrote before it looked at the used ring never clears a bit
        set for a buffer the guest has not seen (docs/trap-abi.md, section 7).
        The full fence orders the device's used-ring writes before the slot
        loads; a slot being completed further up the stack is skipped. Only
        ``offset`` is served here: an acknowledgement enters no device code, so
        no device is re-entered from inside its own interrupt.
        """
        if not self.features & abi.F_POSTED_WRITES:
            return 0
        ordering.fence()
        posted = 0
        for bit, slot in self._slot_bits:
            if slot.state == abi.SLOT_POSTED:
                posted |= bit
        posted &= ~self._in_service
        if not posted:
            return 0
        ordering.acquire_fence()            # one, for every state loaded above (as scan_once)
        self._lap = self.clock()
        served = 0
        for index, slot in enumerate(self.slots):
            if (posted >> index & 1 and slot.flags & abi.SLOT_F_POSTED_WRITE
                    and (slot.gpa - self._layout_base) % self._device_size == offset):
                self.complete_slot(index, dispatch)
                served += 1
        return served

    def complete_slot(self, index, dispatch):
        """Decode slot ``index``, ``dispatch`` it, write the answer and publish it."""
        bit = 1 << index
        self._completed |= bit
        slot = self.slots[index]
        gpa, data, size, direction, _, flags, vm, vcpu = _REQUEST.unpack_from(
            self._page, self._request_offsets[index])
        is_write = direction == abi.DIR_WRITE
        if not is_write:
            data = 0
        # The common case inline (an aligned 4-byte access in its own VM's window); anything
        # else, and every malformed slot, through ``_decode``.
        relative = gpa - self._layout_base
        window = relative // self._device_size
        if (size == 4 and direction <= abi.DIR_WRITE and not gpa & 3 and not data >> 32
                and 0 <= relative < self._layout_span and self._window_vms[window] == vm):
            offset = relative - window * self._device_size
        else:
            window = self._decode(index, vm, vcpu, gpa, size, direction, data)
            offset = gpa - self._window_bases[window] if window >= 0 else 0
        if window >= 0:
            in_service = self._in_service   # restored below, not in a ``finally`` (every
            self._in_service = in_service | bit     # Exception is caught; ~50 ns a trap)
            try:
                handled, value = dispatch(window, offset, data, is_write, size)
            except Exception:  # the trap path must answer whatever a device does
                self.stats.handler_errors += 1
                self._handler_error_log("slot %d: dispatch failed on %s of %d bytes at 0x%x",
                                        index, "write" if is_write else "read", size, gpa,
                                        exc_info=True)
                handled = False
            self._in_service = in_service
            if handled:
                status, value = abi.STATUS_OK, (value or 0) & ACCESS_MASKS[size]
            else:
                status, value = abi.STATUS_UNHANDLED, 0
        else:
            status, value = abi.STATUS_UNHANDLED, 0
        if status:
            self.stats.unhandled += 1
            if vm < len(self.vm_unhandled):     # the stub's VM number, not the guest's
                self.vm_unhandled[vm] += 1
        if flags & abi.SLOT_F_POSTED_WRITE and is_write:
            # The guest already resumed and the stub is not waiting: free the slot.
            if WEAKLY_ORDERED:
                ordering.release_fence()
            slot.state = abi.SLOT_FREE
            self.posted[window] += 1
        else:
            if flags & abi.SLOT_F_POSTED_WRITE:
                self._warn("slot %d: posted-write flag on a read of 0x%x: answered normally",
                           index, gpa)
            if not is_write:
                slot.data = value
            slot.status = status
            if WEAKLY_ORDERED:
                ordering.release_fence()
            slot.state = abi.SLOT_DONE
            self.waited[window] += 1
        # Its service time: since the previous answer of this pass, or the pass's start
        # (one clock read per trap; a nested pass's traps take their own share).
        now = self.clock()
        took, self._lap = now - self._lap, now
        self.service_ns[window] += took
        if self.trace is not None:
            self.trace(vm, vcpu, gpa, size, is_write, data if is_write else value, status,
                       took, window, offset)

    def _update_recent(self, owners):
        """``_recent``, updated in place for each VM v with bit v of ``owners`` set: its traps
        since its account was last halved; an account halves, when looked at, once for each
        ``FAIR_WINDOW_NS`` passed since its last halving (every account on the same grid)."""
        base, halved_at, recent = self._account_base, self._halved_at, self._recent
        now = self.clock()
        for vm in range(len(recent)):
            if not owners >> vm & 1:
                continue
            traps = self.vm_traps(vm)
            halvings = (now - halved_at[vm]) // FAIR_WINDOW_NS
            if halvings:
                halved_at[vm] += halvings * FAIR_WINDOW_NS
                base[vm] = traps - ((traps - base[vm]) >> halvings)
            recent[vm] = traps - base[vm]
        return recent

    def vm_traps(self, vm):
        """VM ``vm``'s traps answered so far (waited for or posted); allocates nothing."""
        waited, posted, traps = self.waited, self.posted, 0
        for window in self._vm_windows[vm]:
            traps += waited[window] + posted[window]
        return traps

    def _decode(self, index, vm, vcpu, gpa, size, direction, data):
        """The window number of a well-formed slot of its own VM, else -1 (UNHANDLED;
        a malformed slot is counted and logged, an address with no device slot is not:
        that is the stub's policy). ``data``: the value written, 0 for a read."""
        mask = ACCESS_MASKS.get(size)
        if mask is None:
            problem = f"access size {size}"
        elif direction > abi.DIR_WRITE:
            problem = f"direction {direction}"
        elif gpa % size:
            problem = f"{size}-byte access at 0x{gpa:x} not aligned"
        elif data & ~mask:
            problem = f"write value 0x{data:x} wider than {size} bytes"
        else:
            relative = gpa - self._layout_base
            if not 0 <= relative < self._layout_span:
                return -1
            window = relative // self._device_size
            owner = self._window_vms[window]
            if owner is None:
                return -1                       # past the VM's device slots
            if owner == vm:
                return window
            problem = f"address 0x{gpa:x} is in VM {owner}'s window"
        self.stats.malformed += 1
        self._warn("slot %d (VM %d vCPU %d): %s: answered UNHANDLED",
                   index, vm, vcpu, problem)
        return -1

    # -- introspection -----------------------------------------------------------------

    def window_counters(self, window):
        """``{"traps_waited", "posted_writes", "shadow_reads", "stub_acks"}`` of window number
        ``window``: what the guest waited for, what it did not, what the stub answered or
        took itself."""
        shadows = self.shadows
        return {"traps_waited": self.waited[window], "posted_writes": self.posted[window],
                "shadow_reads": shadows.hits(window) if shadows is not None else 0,
                "stub_acks": shadows.acks_taken(window) if shadows is not None else 0}

    def pace(self, vm, us):
        """Ask the stub to wait ``us`` microseconds (0: not at all) before each access of VM
        ``vm``'s vCPUs (``AVT_F_PACE``, docs/trap-abi.md section 16; nothing without it).
        A slot is VM ``vm``'s once the stub posted from it (``seq`` not 0) with that
        ``vm_id``: a vCPU that never trapped is left alone."""
        if not self.features & abi.F_PACE:
            return
        self.vm_paced[vm] = bool(us)
        for slot in self.slots:
            if slot.seq and slot.vm_id == vm:
                slot.pace_us = min(us, abi.PACE_MAX_US)

    def _clear_paces(self):
        for slot in self.slots:
            slot.pace_us = 0
        for vm in range(len(self.vm_paced)):
            self.vm_paced[vm] = False

    def vm_counters(self, vm):
        """``{"traps_served", "service_ms", "traps_deferred", "traps_unhandled", "wfi_caught",
        "wfi_ran_out", "wfi_slept"}`` of VM ``vm``: the daemon's time spent on its traps, how
        often the fair order put its slots off, its accesses answered UNHANDLED, and the
        stub's halt-polling counters from its vCPUs' slots (``AVT_F_HALT_POLL``; zero with a
        stub that keeps none)."""
        slots = [slot for slot in self.slots if slot.vm_id == vm]
        return {"traps_served": self.vm_traps(vm),
                "service_ms": round(sum(self.service_ns[w] for w in self._vm_windows[vm]) / 1e6,
                                    3),
                "traps_deferred": self.vm_deferred[vm],
                "traps_unhandled": self.vm_unhandled[vm],
                **{name: sum(getattr(slot, name) for slot in slots)
                   for name in ("wfi_caught", "wfi_ran_out", "wfi_slept")}}

    def info(self):
        header = self.header
        return {
            "abi": f"{header.abi_major}.{header.abi_minor}",
            "slots": len(self.slots),
            "stub_features": header.stub_features,
            "model_features": self.features,
            "wait": self.wait,
            "busy_poll": self.wait == BUSY_POLL,
            **(self.window.info() if self.window is not None else {}),
            **self.stats.as_dict(),
        }

