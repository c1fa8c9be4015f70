"""virtio-console (device ID 3, VirtIO 1.2 section 5.3).

Port 0 uses receiveq 0 / transmitq 1. With VIRTIO_CONSOLE_F_MULTIPORT the
control queues are 2 (device -> driver) and 3 (driver -> device), and port
``p >= 1`` uses queues ``2 + 2p`` / ``3 + 2p``; named ports appear in a Linux
guest as /dev/vportNpM with /sys/class/virtio-ports/vportNpM/name.
VIRTIO_CONSOLE_F_SIZE (offered when ``size`` is given) reports cols/rows;
VIRTIO_CONSOLE_F_EMERG_WRITE takes single characters through ``emerg_wr``.

Flow control (nothing lost):

* host -> guest: a port reads its backend only while it holds a guest
  receive buffer (and, for a multiport port other than the console, while
  the guest has it open: Linux discards data for closed ports); otherwise it
  pauses the backend's reader and resumes when the guest posts buffers.
* guest -> host: transmit buffers are handed to the backend as they are
  (memoryviews of guest RAM, no copy) and held until every attached
  endpoint has handed all their bytes to the kernel; only then does the
  guest get them back. The held buffers are the output buffer, bounded by
  the backend (``limit`` bytes, ``MAX_HELD`` buffers); while it is full the
  port takes no more and asks the driver not to notify (``set_notification``).
  So a byte the guest saw acknowledged survives the daemon's death. With no
  attached endpoint (no client on a socket) the guest does not wait: its
  output goes to the backend's bounded unattached log (``log_size``), which
  the next client receives first.
* emergency writes have no flow control in the spec: they are copied into
  port 0's stream, up to ``EMERG_LIMIT`` bytes not yet written, and counted
  as errors beyond that.
* a device reset drops what is in flight (none of it was acknowledged).

Control messages (multiport): the driver's DEVICE_READY gets a DEVICE_ADD
per port; each PORT_READY gets CONSOLE_PORT (port 0), PORT_NAME (named
ports) and PORT_OPEN with the host side's state: always open for the
console port, open while a client is connected for a named port on a socket
(PORT_OPEN 0/1 follow connects and disconnects); the driver's PORT_OPEN
opens and closes the guest side.
"""

import collections
import logging
import struct

from ..backends.console import open_console_backend
from ..virtio.buffers import gather, scatter
from ..virtio.constants import ID_CONSOLE, bit
from ..virtio.device import VirtioDevice

log = logging.getLogger(__name__)

F_SIZE, F_MULTIPORT, F_EMERG_WRITE = 0, 1, 2

DEVICE_READY, DEVICE_ADD, DEVICE_REMOVE, PORT_READY = 0, 1, 2, 3
CONSOLE_PORT, RESIZE, PORT_OPEN, PORT_NAME = 4, 5, 6, 7

CONFIG = struct.Struct("<HHII")          # cols, rows, max_nr_ports, emerg_wr
CONTROL = struct.Struct("<IHH")          # id, event, value
EMERG_WR_OFFSET = 8
QUEUE_SIZE, CONTROL_QUEUE_SIZE = 256, 32
EMERG_LIMIT = 64 * 1024
CONTROL_OUT_LIMIT = 256                  # device -> driver control messages waiting
EMERGENCY = object()                     # the token of emergency bytes in port 0's stream


class ConsolePort:
    """One port: its two queues, its backend, and the flow-control state of each direction."""

    def __init__(self, device, port_id, rx_index, tx_index, backend, name=None):
        self.device, self.id, self.name = device, port_id, name
        self.rx_index, self.tx_index = rx_index, tx_index
        self.backend = backend
        self.guest_open = False
        self.guest_ready = False         # the driver sent PORT_READY (multiport)
        self.host_open = None            # what the driver was last told (PORT_OPEN)
        self._rx_chain = None
        self._tx_notify = True           # what the driver was last asked (notifications on)
        self._input_paused = False

    @property
    def rxq(self):
        return self.device.queues[self.rx_index]

    @property
    def txq(self):
        return self.device.queues[self.tx_index]

    def reset(self):
        """Drop chains held from the guest (their queues are being reset)."""
        self._rx_chain = None
        self.drop_tx()
        self.guest_open = self.guest_ready = False
        self.host_open = None

    def drop_tx(self):
        """Forget the transmit buffers in flight (their queue was reset)."""
        for token, length in self.backend.discard_output():
            if token is EMERGENCY:
                self.device.emergency_dropped(length)
        self._tx_notify = True

    # -- host -> guest ---------------------------------------------------------------------------

    def fill_rx(self):
        """Move backend input into guest receive buffers while both exist."""
        device, rxq = self.device, self.rxq
        if not (device.active and rxq.ready and self.guest_open):
            self._pause_input()
            return
        completed = False
        while True:
            if self._rx_chain is None:
                chain = rxq.pop()
                if chain is None:
                    self._pause_input()
                    break
                if not chain.writable_len:
                    device.guest_error("port %d: receive buffer with no writable part; "
                                       "returned empty", self.id)
                    rxq.add_used(chain.head, 0)
                    completed = True
                    continue
                self._rx_chain = chain
            self._resume_input()
            n = self.backend.readinto(self._rx_chain.writable)
            if not n:
                break
            rxq.add_used(self._rx_chain.head, n)
            device.count(bytes_to_guest=n)
            self._rx_chain = None
            completed = True
        if completed:
            device.signal_used(rxq)

    def _pause_input(self):
        if not self._input_paused:
            self._input_paused = True
            self.backend.pause_input()

    def _resume_input(self):
        if self._input_paused:
            self._input_paused = False
            self.backend.resume_input()

    # -- guest -> host ---------------------------------------------------------------------------

    def drain_tx(self):
        """Hand transmit buffers to the backend; return each once every attached endpoint
        has taken all its bytes."""
        device, txq, backend = self.device, self.txq, self.backend
        returned = self._return_done()
        if device.active and txq.ready and not backend.attached:
            returned += self._log_unattached()
        elif device.active and txq.ready:
            while True:
                while backend.can_take():
                    chain = txq.pop()
                    if chain is None:
                        break
                    if chain.readable_len:
                        backend.submit(chain.readable, chain.readable_len, chain)
                    else:
                        txq.add_used(chain.head, 0)
                        returned += 1
                backend.flush()
                done = self._return_done()
                returned += done
                if done:
                    continue
                take = backend.can_take()
                if take == self._tx_notify:
                    break
                self._tx_notify = take
                if not (txq.set_notification(take) and take):
                    break
        else:
            backend.flush()                       # emergency bytes
            returned += self._return_done()
        if returned:
            device.signal_used(txq)

    def _log_unattached(self):
        """Nobody reads: the output goes to the backend's log and straight back to the
        guest (which must not wait, see ``avatar_hw.backends.console``); the number of
        chains returned."""
        device, txq, backend = self.device, self.txq, self.backend
        returned = self._complete(backend.spill())
        for chain in txq:
            backend.log_output(chain.readable)
            txq.add_used(chain.head, 0)
            device.count(bytes_from_guest=chain.readable_len)
            returned += 1
        if not self._tx_notify:
            self._tx_notify = True
            txq.set_notification(True)
            if txq.has_available() and not txq.yielded:
                returned += self._log_unattached()
        return returned

    def _return_done(self):
        """Give back what the backend is done with; the number of chains returned."""
        return self._complete(self.backend.take_done())

    def _complete(self, done):
        """Return the transmit chains of ``done`` (``(token, length)``); their number."""
        returned = 0
        device = self.device
        for token, length in done:
            if token is EMERGENCY:
                device.emergency_written(length)
                continue
            self.txq.add_used(token.head, 0)
            device.count(bytes_from_guest=length)
            returned += 1
        return returned


class ConsoleDevice(VirtioDevice):
    """A virtio console.

    ``backend``: port 0's host side (URL, list of URLs, ``ConsoleBackend`` or
    None). ``ports``: {name: backend spec} for named ports 1.. (offers
    MULTIPORT; ``multiport=True`` offers it with port 0 only). ``size``:
    (cols, rows) to offer VIRTIO_CONSOLE_F_SIZE. ``limit``: output buffer
    bound per endpoint. ``log_size``: bytes kept per port while no endpoint is
    attached (the unattached log).
    """

    device_id = ID_CONSOLE
    name = "console"

    def __init__(self, backend=None, *, ports=None, size=None, multiport=None, emerg_write=True,
                 limit=None, log_size=None):
        ports = dict(ports or {})
        multiport = bool(ports) if multiport is None else multiport
        if ports and not multiport:
            raise ValueError("named console ports need multiport")
        features = ((bit(F_SIZE) if size else 0) | (bit(F_MULTIPORT) if multiport else 0)
                    | (bit(F_EMERG_WRITE) if emerg_write else 0))
        nports = 1 + len(ports)
        queue_sizes = [QUEUE_SIZE, QUEUE_SIZE]
        if multiport:
            queue_sizes += [CONTROL_QUEUE_SIZE] * 2 + [QUEUE_SIZE] * (2 * len(ports))
        cols, rows = size or (0, 0)
        super().__init__(queue_sizes=queue_sizes, features=features,
                         config=CONFIG.pack(cols, rows, nports if multiport else 0, 0))
        kw = {} if limit is None else {"limit": limit}
        if log_size is not None:
            kw["log_size"] = log_size
        self.ports = [ConsolePort(self, 0, 0, 1, open_console_backend(backend, **kw))]
        for i, (port_name, spec) in enumerate(ports.items(), start=1):
            self.ports.append(ConsolePort(self, i, 2 + 2 * i, 3 + 2 * i,
                                          open_console_backend(spec, **kw), port_name))
        self._port_by_queue = {}
        for port in self.ports:
            self._port_by_queue[port.rx_index] = (port, port.fill_rx)
            self._port_by_queue[port.tx_index] = (port, port.drain_tx)
        self._control_out = collections.deque()     # device -> driver messages waiting
        self._devices_added = False                  # DEVICE_ADDs sent since the reset
        self._control_in = bytearray(CONTROL.size)
        self._emerg_held = 0                         # emergency bytes not yet written

    # -- lifecycle -------------------------------------------------------------------------------

    def attach(self, loop):
        super().attach(loop)
        for port in self.ports:
            port.backend.attach(self.loop, port.fill_rx, port.drain_tx,
                                lambda port=port: self._host_side_changed(port))
            port.fill_rx()                        # not active yet: pauses the reader

    def detach(self):
        for port in self.ports:
            port.backend.close()
        super().detach()

    def activate(self):
        if not self.has_feature(F_MULTIPORT):
            self.ports[0].guest_open = True       # a single console port is always open
        self._service_all()

    def reset(self):
        for port in self.ports:
            port.reset()
            port.fill_rx()                        # pauses input until the next activation
        self._control_out.clear()
        self._devices_added = False

    def queue_reset(self, index):
        if index in self._port_by_queue:
            port, _ = self._port_by_queue[index]
            if index == port.rx_index:
                port._rx_chain = None
            else:
                port.drop_tx()

    def _service_all(self):
        for port in self.ports:
            port.fill_rx()
            port.drain_tx()

    # -- queues ----------------------------------------------------------------------------------

    def queue_notify(self, index):
        entry = self._port_by_queue.get(index)
        if entry is not None:
            entry[1]()
        elif index == 2:
            self._flush_control()
        elif index == 3:
            self._read_control()

    def _host_side_changed(self, port):
        self._report_host_side(port)
        port.drain_tx()                           # who holds the output may have changed

    # -- configuration ---------------------------------------------------------------------------

    def write_config(self, offset, data):
        if offset == EMERG_WR_OFFSET and self.has_feature(F_EMERG_WRITE):
            self._emergency_write(data[0])
        else:
            super().write_config(offset, data)

    def _emergency_write(self, char):
        if self._emerg_held >= EMERG_LIMIT:
            self.counters["errors"] += 1
            return
        self._emerg_held += 1
        port = self.ports[0]
        port.backend.submit_bytes(bytes((char,)), EMERGENCY)
        port.drain_tx()

    def emergency_written(self, length):
        self._emerg_held -= length
        self.count(requests=0, bytes_from_guest=length)

    def emergency_dropped(self, length):
        self._emerg_held -= length
        self.counters["errors"] += 1

    def resize(self, cols, rows):
        """New terminal size: config (F_SIZE) and, with multiport, a RESIZE message for port 0."""
        self.update_config(0, struct.pack("<HH", cols, rows))
        if self.has_feature(F_MULTIPORT):
            self._send_control(0, RESIZE, 0, struct.pack("<HH", rows, cols))

    # -- control queues (multiport) ----------------------------------------------------------------

    def _send_control(self, port_id, event, value, payload=b""):
        if len(self._control_out) >= CONTROL_OUT_LIMIT:
            self.guest_error("%d control messages wait for buffers in control queue 2",
                             len(self._control_out))
            self.fail("the driver takes no control messages")
            return
        self._control_out.append(CONTROL.pack(port_id, event, value) + payload)
        self._flush_control()

    def _flush_control(self):
        queue = self.queues[2] if len(self.queues) > 2 else None
        if queue is None or not (self.active and queue.ready):
            return
        completed = False
        while self._control_out:
            chain = queue.pop()
            if chain is None:
                break
            message = self._control_out.popleft()
            n = scatter(message, chain.writable)
            if n < len(message):
                self.guest_error("control buffer of %d bytes too small for a %d-byte "
                                 "message; truncated", chain.writable_len, len(message))
            queue.add_used(chain.head, n)
            completed = True
        if completed:
            self.signal_used(queue)

    def _read_control(self):
        queue = self.queues[3]
        message = self._control_in
        for chain in queue:
            n = gather(chain.readable, message)
            queue.add_used(chain.head, 0)
            if n < CONTROL.size:
                self.guest_error("short control message (%d bytes); ignored", n)
                continue
            self._handle_control(*CONTROL.unpack(message))
        self.signal_used(queue)

    def _handle_control(self, port_id, event, value):
        if event == DEVICE_READY:
            if value != 1:
                self.guest_error("driver failed to set up (DEVICE_READY %d)", value)
                return
            if self._devices_added:
                self.guest_error("repeated DEVICE_READY; ignored")
                return
            self._devices_added = True
            for port in self.ports:
                self._send_control(port.id, DEVICE_ADD, 0)
            return
        if port_id >= len(self.ports):
            self.guest_error("control event %d for unknown port %d; ignored", event, port_id)
            return
        port = self.ports[port_id]
        if event == PORT_READY:
            if value != 1:
                self.guest_error("driver could not add port %d", port_id)
                return
            if port.guest_ready:
                self.guest_error("repeated PORT_READY for port %d; ignored", port_id)
                return
            if port_id == 0:
                self._send_control(0, CONSOLE_PORT, 1)
                port.guest_open = True
            if port.name:
                self._send_control(port_id, PORT_NAME, 1, port.name.encode())
            port.guest_ready = True
            self._report_host_side(port)
            port.fill_rx()
        elif event == PORT_OPEN:
            port.guest_open = bool(value) or port_id == 0
            port.fill_rx()
        else:
            self.guest_error("unexpected control event %d from the driver; ignored", event)

    def _report_host_side(self, port):
        """PORT_OPEN to the driver when the host side of a named port opens or closes.

        The console port (0) is always open; a named port is open while its
        backend has someone at the host end (a socket client). While it is
        closed a Linux guest blocks writers and reads return EOF; output
        already queued is kept for the next client.
        """
        if not (port.guest_ready and self.active and self.has_feature(F_MULTIPORT)):
            return
        is_open = port.id == 0 or port.backend.connected
        if is_open != port.host_open:
            port.host_open = is_open
            self._send_control(port.id, PORT_OPEN, int(is_open))

    # -- introspection ----------------------------------------------------------------------------

    def info(self):
        out = super().info()
        out["ports"] = [{"id": p.id, "name": p.name, "guest_open": p.guest_open,
                         "host_open": bool(p.host_open),
                         "endpoints": [ep.url for ep in p.backend.endpoints],
                         "buffered": p.backend.buffered, "log": len(p.backend.log),
                         "log_overwritten": p.backend.log_overwritten} for p in self.ports]
        return out

