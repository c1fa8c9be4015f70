"""virtio-net (device ID 1, VirtIO 1.2 section 5.1): one receive and one transmit queue.

Features: VIRTIO_NET_F_MAC (the configured or a random locally administered
address), F_STATUS (link up; ``set_link`` changes it with a configuration
interrupt), F_MTU (``mtu``, default 1500), F_MRG_RXBUF (a frame may span
several receive buffers; ``num_buffers`` in the header says how many). No
checksum or segmentation offloads: every header the device writes is zero
but ``num_buffers``, and a transmitted header must ask for none.

Every buffer starts with the 12-byte ``virtio_net_hdr_v1`` (VERSION_1 or
MRG_RXBUF; 10 bytes for a legacy driver without MRG_RXBUF). Frames are
Ethernet frames without FCS, at most ``mtu + 18`` bytes (VLAN tag included).

Network semantics (the guest is told nothing about drops):

* transmit: a chain is completed (length 0) once its frame was handed to the
  backend or dropped and counted. A chain shorter than header + Ethernet
  header, longer than the largest frame, or whose header asks for an offload
  is dropped and counted (``tx_malformed``); a frame the backend refuses (TAP
  down, a switch port stalled) is dropped and counted (``tx_dropped``); with
  the link down frames are dropped (``tx_dropped``), and a link going down drops
  the chain waiting for a busy backend and the rest of the queue. A backend that is merely
  busy (a switch peer whose socket is full) returns ``BUSY``: the chain stays
  unused and the queue waits until the backend calls ``transmit_ready`` (flow
  control, avatar_hw.backends.egress).
* receive: a frame goes straight from the backend into the guest's receive
  buffers when the device holds buffers for the largest frame and no older
  frame waits; otherwise it is copied once into the bounded pending frames
  (``rx_pending`` frames, preallocated) and from there into guest buffers, in
  order, as soon as they can take it. While they are full ``can_receive`` is
  False: the backend holds frames back (the switch's flow control for another
  VM's frames, a TAP not read) until ``backend.receive_ready``; a frame it does
  not hold (a switch's remote peer) is dropped. A frame for a stalled switch port,
  one while the driver is not running or the link is down (a link going down
  drops the pending frames), and one larger
  than the largest frame (or, without MRG_RXBUF, than the receive buffer) is
  dropped and counted (``rx_dropped``).

Receive buffers are popped as needed and held until a frame fills them
(``reset`` drops the held ones); a buffer too small for the header goes back
empty (VirtIO 1.2 5.1.6.3.1). At most ``MAX_HELD_VIEWS`` descriptors are held
(plus one chain): a guest whose buffers hold too little for a frame within
that many descriptors loses the frames (``rx_dropped``), not the daemon's
memory. A frame spanning more than IOV_MAX descriptors is read into the
pending frames and copied from there (one system call cannot take more).

An injected ``delay`` fault holds a copy of each delayed frame until its timer: at
most ``MAX_DELAYED`` frames of at most ``MAX_DELAYED_BYTES`` in all; one more is
dropped and counted (``tx_dropped``, a rate-limited warning).
"""

import collections
import logging
import struct

from ..backends.net import BUSY, open_net_backend
from ..ratelimit import RateLimitedLog
from ..schema import Field, Schema, under
from ..virtio.buffers import IOV_MAX, copy, gather, scatter, skip, truncate
from ..virtio.constants import F_VERSION_1, ID_NET, bit
from ..virtio.device import VirtioDevice
from .net_frames import PendingFrames, default_mac, format_mac, parse_mac

F_MTU, F_MAC, F_MRG_RXBUF, F_STATUS = 3, 5, 15, 16
S_LINK_UP = 1
CONFIG = struct.Struct("<6sHHH")          # mac, status, max_virtqueue_pairs, mtu
STATUS_OFFSET = 6
HEADER = struct.Struct("<BBHHHHH")        # flags, gso_type, hdr_len, gso_size, csum_start,
                                          # csum_offset, num_buffers
HEADER_LEN, LEGACY_HEADER_LEN = 12, 10
ETH_HLEN, VLAN_HLEN = 14, 4
MIN_MTU, MAX_MTU = 68, 65535
RX, TX = 0, 1
QUEUE_SIZE = 256
MAX_DELAYED = 1024                    # frames a delay fault holds at once
MAX_DELAYED_BYTES = 4 << 20

log = logging.getLogger(__name__)
DEFAULT_RX_PENDING = 64
MAX_HELD_VIEWS = 2048      # receive descriptors held at a time (bounds what a guest pins)


def check_mtu(mtu):
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"{mtu!r} is not an MTU from {MIN_MTU} to {MAX_MTU}")


def check_rx_pending(frames):
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= 4096:
        raise ValueError(f"{frames!r} is not a number of frames from 1 to 4096")


def _corrupted_byte(fault, length):
    """Which byte of a ``length``-byte frame a ``corrupt`` fault inverts: one past the
    Ethernet header, none in a frame that is all header."""
    return fault.rng.randrange(ETH_HLEN, length) if length > ETH_HLEN else None


class NetDevice(VirtioDevice):
    """A virtio NIC on ``backend`` (a URL: ``tap:NAME``, ``switch:PATH``; or a backend
    object). ``mac``: a string (default: ``net_frames.default_mac``, fixed when the device
    is plugged in); ``mtu``;
    ``rx_pending``: frames kept while the guest has no receive buffers."""

    device_id = ID_NET
    name = "net"
    restartable = True

    def __init__(self, backend, *, mac=None, mtu=1500, rx_pending=DEFAULT_RX_PENDING):
        check_mtu(mtu)
        check_rx_pending(rx_pending)
        self.mac = parse_mac(mac) if mac else bytes([0x02, 0, 0, 0, 0, 0])
        self._default_mac = not mac
        self.mtu = mtu
        self.max_frame = mtu + ETH_HLEN + VLAN_HLEN
        super().__init__(queue_sizes=[QUEUE_SIZE, QUEUE_SIZE],
                         features=bit(F_MAC) | bit(F_STATUS) | bit(F_MTU) | bit(F_MRG_RXBUF),
                         config=CONFIG.pack(self.mac, S_LINK_UP, 1, mtu))
        self.backend = open_net_backend(backend) if isinstance(backend, str) else backend
        self.link_up = True
        self.counters.update(rx_frames=0, tx_frames=0, rx_dropped=0, tx_dropped=0,
                             tx_malformed=0)
        self._rx_pending = PendingFrames(rx_pending, self.max_frame)
        self._drop = memoryview(bytearray(self.max_frame))   # frames nobody takes land here
        self._held = collections.deque()      # receive chains popped, not yet filled
        self._held_room = 0                   # their writable bytes
        self._held_views = 0                  # their descriptors (MAX_HELD_VIEWS + a chain)
        self._header = bytearray(HEADER_LEN)
        self._header_len = HEADER_LEN
        self._mergeable = False
        self._tx_waiting = None               # the transmit chain the backend was busy for
        self._delayed = self._delayed_bytes = 0   # frames a delay fault holds, their bytes
        self._delay_timers = {}               # their timers (cancelled when detached)
        self._delay_full_log = RateLimitedLog(log)

    # -- lifecycle --------------------------------------------------------------------------------

    def bind(self, context):
        super().bind(context)
        if self._default_mac:
            self.mac = default_mac(context.intid)
            self.config[:len(self.mac)] = self.mac

    def attach(self, loop):
        super().attach(loop)
        self.backend.attach(self.loop, self)

    # -- a restart under a running guest (avatar_hw.state) ---------------------------------------

    def saved_state(self):
        """The MAC the guest read (a default one depends on the host: it must not change
        under a running guest, whose frames the switch port would then drop as spoofed) and
        the link status it was told (``set_link``: a cable the operator pulled stays out)."""
        return {"mac": format_mac(self.mac), "link_up": self.link_up}

    def restore_state(self, saved, words, live):
        mac = parse_mac(saved["mac"]) if "mac" in saved else self.mac
        link_up = saved.get("link_up", True)
        if not isinstance(link_up, bool):
            raise ValueError(f"link_up {link_up!r} is not true or false")
        if mac != self.mac:
            self.backend.change_mac(mac)
            self.mac = mac
            self.config[:len(mac)] = mac
        self.link_up = link_up                # the guest read it already: no interrupt
        self.config[STATUS_OFFSET:STATUS_OFFSET + 2] = struct.pack(
            "<H", S_LINK_UP if link_up else 0)

    def detach(self):
        self.backend.close()
        for handle in self._delay_timers.values():   # their frames have no backend now
            self.loop.cancel(handle)
        self._delay_timers.clear()
        self._delayed = self._delayed_bytes = 0
        super().detach()

    def activate(self):
        self._mergeable = self.has_feature(F_MRG_RXBUF)
        self._header_len = (HEADER_LEN if self._mergeable or self.has_feature(F_VERSION_1)
                            else LEGACY_HEADER_LEN)
        self._transmit()
        self._drain_rx_pending()

    def reset(self):
        self._drop_held()
        self._rx_pending.clear()
        self._tx_waiting = None
        self.backend.receive_ready(0, self._rx_pending.capacity)

    def queue_reset(self, index):
        if index == RX:
            self._drop_held()
        elif index == TX:
            self._tx_waiting = None

    def _drop_held(self):
        self._held.clear()
        self._held_room = self._held_views = 0

    def queue_notify(self, index):
        if index == RX:
            self._drain_rx_pending()
        elif index == TX:
            self._transmit()

    def set_link(self, up):
        """Link status for the guest (F_STATUS), with a configuration-change interrupt. A link
        going down drops what waits both ways, as QEMU: the frames pending for receive
        buffers, the transmit chain the backend was busy for and the rest of the queue."""
        self.link_up = bool(up)
        self.update_config(STATUS_OFFSET, struct.pack("<H", S_LINK_UP if up else 0))
        self.keep_state()
        if self.link_up:
            return
        if self._rx_pending:
            self.counters["rx_dropped"] += len(self._rx_pending)
            self._rx_pending.clear()
            self.backend.receive_ready(0, self._rx_pending.capacity)
        self.transmit_ready()                 # the waiting chain and the queue: dropped

    # -- transmit ---------------------------------------------------------------------------------

    def transmit_ready(self):
        """The backend can take frames again (after ``BUSY``): the waiting chain first."""
        chain, self._tx_waiting = self._tx_waiting, None
        txq = self.queues[TX]
        if chain is None or not (self.active and txq.ready):
            return
        if not self._hand_over(chain):
            txq.add_used(chain, 0)
            self.signal_used(txq)
            txq.new_turn()                    # a loop turn of its own
            self._transmit()

    def _transmit(self):
        txq = self.queues[TX]
        if self.active and txq.ready and self._tx_waiting is None:
            self.consume(txq, self._send)

    def _send(self, chain):
        """Check the chain and hand its frame over; True when the backend was busy (the
        chain waits in ``_tx_waiting`` until ``transmit_ready``), False when it is done with."""
        header_len, counters = self._header_len, self.counters
        length = chain.readable_len - header_len
        if length < ETH_HLEN or length > self.max_frame:
            counters["tx_malformed"] += 1
            self.guest_error("transmit chain of %d bytes: not a %d-byte header and a frame of "
                             "%d to %d bytes; dropped", chain.readable_len, header_len, ETH_HLEN,
                             self.max_frame)
            return False
        header = self._header
        gather(chain.readable, memoryview(header)[:header_len])
        if header[0] or header[1]:            # flags (NEEDS_CSUM...), gso_type: not offered
            counters["tx_malformed"] += 1
            self.guest_error("transmit header asks for offloads (flags 0x%x, gso_type %d) "
                             "that were not negotiated; dropped", header[0], header[1])
            return False
        faults = self.context.faults
        if faults is not None and (fault := faults.frame("tx")) is not None:
            self.count(bytes_from_guest=length)
            counters["tx_frames"] += 1
            self._tx_fault(fault, skip(chain.readable, header_len), length)
            return False
        return self._hand_over(chain)

    def _hand_over(self, chain):
        """Give a checked chain's frame to the backend: True (and the chain waits) when
        it is busy; otherwise counted, and dropped when it was not taken."""
        length = chain.readable_len - self._header_len
        sent = self.link_up and self.backend.send(skip(chain.readable, self._header_len),
                                                  length)
        if sent is BUSY:
            self._tx_waiting = chain
            return True
        self.count(bytes_from_guest=length)
        self.counters["tx_frames"] += 1
        if not sent:
            self.counters["tx_dropped"] += 1
        return False

    def _tx_fault(self, fault, views, length):
        """An injected fault (avatar_hw.faults) meets a transmitted frame: ``drop`` it,
        send a copy with one payload byte inverted (``corrupt``) or send a copy later
        (``delay``)."""
        if fault.name == "drop":
            self.counters["tx_dropped"] += 1
            return
        frame = bytearray(length)
        gather(views, frame)
        if fault.name == "corrupt":
            at = _corrupted_byte(fault, length)
            if at is not None:
                frame[at] ^= 0xFF
            self._send_copy(frame)
        elif (self._delayed >= MAX_DELAYED
              or self._delayed_bytes + length > MAX_DELAYED_BYTES):
            self.counters["tx_dropped"] += 1
            self._delay_full_log("%s: delay fault holds %d frames (%d bytes), the most it "
                                 "holds: frame dropped", self.name, self._delayed,
                                 self._delayed_bytes)
        else:
            self._delayed += 1
            self._delayed_bytes += length
            key = object()
            self._delay_timers[key] = self.loop.call_later(
                fault.options["ms"] / 1000, lambda: self._send_delayed(key, frame))

    def _send_delayed(self, key, frame):
        del self._delay_timers[key]
        self._delayed -= 1
        self._delayed_bytes -= len(frame)
        self._send_copy(frame)

    def _send_copy(self, frame):
        """An injected fault's copy: not held in the guest, so a busy backend drops it."""
        if not (self.link_up and self.backend.send([memoryview(frame)], len(frame)) is True):
            self.counters["tx_dropped"] += 1

    def _rx_fault(self, views, length):
        """True when an injected fault (avatar_hw.faults) drops the frame just read into
        ``views``; a ``corrupt`` fault inverts one of its bytes past the Ethernet header."""
        fault = self.context.faults.frame("rx")
        if fault is None:
            return False
        if fault.name == "drop":
            self.counters["rx_dropped"] += 1
            return True
        at = _corrupted_byte(fault, length)
        for view in views if at is not None else ():
            if at < len(view):
                view[at] ^= 0xFF
                break
            at -= len(view)
        return False

    # -- receive ----------------------------------------------------------------------------------

    @property
    def pending_frames(self):
        """Frames waiting for receive buffers."""
        return len(self._rx_pending)

    def can_receive(self):
        """False while a frame would be dropped for want of receive buffers (the pending
        frames are full): the backend then holds its frames back until ``receive_ready``."""
        return not (self.active and self.link_up) or self._rx_pending.free_slot() is not None

    def receive(self, reader, source):
        """Take one frame from the backend: ``reader(source, views) -> length | None``
        (see ``avatar_hw.backends.net``). False when there was nothing to read."""
        need = self._header_len + self.max_frame
        if not (self.active and self.link_up):
            length = reader(source, [self._drop])
            if length is None:
                return False
        elif not self._rx_pending and self._hold(need) and len(
                views := self._frame_views(need)) <= IOV_MAX:
            length = reader(source, views)     # straight into the guest's buffers
            if length is None:
                return False
            if length <= self.max_frame:
                if self.context.faults is None or not self._rx_fault(views, length):
                    self._fill(length)
                return True
        else:
            slot = self._rx_pending.free_slot()
            length = reader(source, [self._drop if slot is None else slot])
            if length is None:
                return False
            if slot is not None and length <= self.max_frame:
                if self.context.faults is not None and self._rx_fault([slot], length):
                    return True
                self._rx_pending.push(length)
                self._drain_rx_pending()     # held buffers may fit this frame, if not any
                return True
        self.counters["rx_dropped"] += 1
        return True

    def _drain_rx_pending(self):
        """Move waiting frames into receive buffers, oldest first, while there are buffers."""
        rxq = self.queues[RX]
        if not (self.active and rxq.ready):
            return
        pending = len(self._rx_pending)
        while self._rx_pending:
            frame, length = self._rx_pending.oldest()
            need = self._header_len + length
            if not self._hold(need):
                if self._mergeable and (self._held_views >= MAX_HELD_VIEWS
                                        or len(self._held) >= rxq.size):
                    self.counters["rx_dropped"] += 1     # no more may be held, or can come
                    self.guest_error("%d receive buffers (%d descriptors, the whole ring or "
                                     "all that may be held) hold %d bytes, too few for a "
                                     "%d-byte frame; frame dropped", len(self._held),
                                     self._held_views, self._held_room, length)
                elif self._mergeable or not self._held:
                    break
                else:
                    self.counters["rx_dropped"] += 1     # larger than the one receive buffer
                    self.guest_error("receive buffer of %d bytes is too small for a %d-byte "
                                     "frame; frame dropped", self._held[0].writable_len,
                                     length)
            else:
                copy([frame], self._frame_views(need))
                self._fill(length)
            self._rx_pending.pop()
        self._hold(0)          # return buffers too small for a header
        if len(self._rx_pending) < pending:
            self.backend.receive_ready(len(self._rx_pending), self._rx_pending.capacity)

    def _hold(self, need):
        """Pop receive chains until the held ones can take ``need`` bytes (one chain
        without MRG_RXBUF); True when they can."""
        rxq, held = self.queues[RX], self._held
        returned = False
        while True:
            if held and (self._held_room >= need if self._mergeable
                         else held[0].writable_len >= need):
                break
            if held and not self._mergeable or self._held_views >= MAX_HELD_VIEWS:
                break
            chain = rxq.pop()
            if chain is None:
                break
            if chain.writable_len < self._header_len:
                self.guest_error("receive buffer of %d bytes cannot hold the %d-byte header; "
                                 "returned empty", chain.writable_len, self._header_len)
                rxq.add_used(chain, 0)
                returned = True
                continue
            held.append(chain)
            self._held_room += chain.writable_len
            self._held_views += len(chain.writable)
        if returned:
            self.signal_used(rxq)
        return bool(held) and (self._held_room >= need if self._mergeable
                               else held[0].writable_len >= need)

    def _frame_views(self, need):
        """Views of the held buffers for a frame of ``need - header`` bytes, past its header."""
        chains = self._held if self._mergeable else (self._held[0],)
        views = [v for chain in chains for v in chain.writable]
        return skip(truncate(views, need), self._header_len)

    def _fill(self, length):
        """The frame of ``length`` bytes is in the held buffers: write its header, give the
        buffers it used back to the driver and interrupt."""
        rxq, header_len = self.queues[RX], self._header_len
        remaining = header_len + length
        buffers = 0
        for chain in self._held:
            buffers += 1
            remaining -= chain.writable_len
            if remaining <= 0:
                break
        header = self._header
        HEADER.pack_into(header, 0, 0, 0, 0, 0, 0, 0, buffers)
        scatter(memoryview(header)[:header_len], self._held[0].writable)
        remaining = header_len + length
        for _ in range(buffers):
            chain = self._held.popleft()
            take = min(chain.writable_len, remaining)
            self._held_room -= chain.writable_len
            self._held_views -= len(chain.writable)
            rxq.add_used(chain, take)
            remaining -= take
        self.count(bytes_to_guest=length)
        self.counters["rx_frames"] += 1
        self.signal_used(rxq)

    # -- introspection ----------------------------------------------------------------------------

    def info(self):
        out = super().info()
        out.update(self.backend.info(), mac=format_mac(self.mac), mtu=self.mtu,
                   link_up=self.link_up, rx_pending=self.pending_frames,
                   tx_waiting=self._tx_waiting is not None)
        return out


SCHEMA = Schema("net", (
    Field("tap", str, None, "a TAP interface name"),
    Field("switch", str, None, "the path of a datagram switch socket", path=under),
    Field("mac", str, None, "a MAC address", parse_mac),
    Field("mtu", int, None, "bytes", check_mtu),
    Field("rx_pending", int, None, "frames kept while the guest has no receive buffers",
          check_rx_pending),
), one_of=("tap", "switch"))


def claims(options):
    """What the device must have to itself (avatar_hw.config): its mac on its switch."""
    if "switch" in options and "mac" in options:
        mac = format_mac(parse_mac(options["mac"]))
        yield "mac", f"MAC {mac} on switch {options['switch']}", False


def from_config(options):
    """The device for a VMs config ``net`` table (checked by ``SCHEMA``)."""
    backend = f"tap:{options['tap']}" if "tap" in options else f"switch:{options['switch']}"
    return NetDevice(backend, mac=options.get("mac"), mtu=options.get("mtu", 1500),
                     rx_pending=options.get("rx_pending", DEFAULT_RX_PENDING))
