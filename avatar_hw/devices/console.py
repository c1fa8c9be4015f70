"""virtio-console (device ID 3, VirtIO 1.2 section 5.3).

Queues (5.3.2, ``console_port.port_queues``): port 0 uses receiveq 0 / transmitq 1. With
VIRTIO_CONSOLE_F_MULTIPORT the control receiveq (device -> driver) is 2 and the
control transmitq (driver -> device) 3, and port ``n >= 1`` uses receiveq
``2n + 2`` / transmitq ``2n + 3``; named ports appear in a Linux guest as
/dev/vportNpM with /sys/class/virtio-ports/vportNpM/name.
VIRTIO_CONSOLE_F_SIZE (offered when ``size`` is given) reports cols/rows;
VIRTIO_CONSOLE_F_EMERG_WRITE takes single characters through ``emerg_wr`` (the low byte
of a write of any width; a write of 0 writes nothing, as QEMU's ``set_config``).

Flow control (nothing lost) is the ports' (``avatar_hw.devices.console_port``);
emergency writes have no flow control in the spec: they are copied into port
0's stream, up to ``EMERG_LIMIT`` bytes not yet written (or dropped past a reset's cut,
``ConsoleBackend.discard_output``), and counted as errors beyond that.

Control messages (multiport): the driver's DEVICE_READY gets a DEVICE_ADD
per port; each PORT_READY gets CONSOLE_PORT (port 0), PORT_NAME (named
ports) and PORT_OPEN with the host side's state: always open for the
console port, open while a client is connected for a named port on a socket
(PORT_OPEN 0/1 follow connects and disconnects); the driver's PORT_OPEN
opens and closes the guest side.
"""

import collections
import os
import struct

from ..backends.console import open_console_backend
from ..endpoints import check_url, url_under
from ..schema import REQUIRED, Field, Schema, up_to
from ..virtio.buffers import gather, scatter
from ..virtio.constants import ID_CONSOLE, bit
from ..virtio.device import VirtioDevice
from .console_port import EMERGENCY, ConsolePort

F_SIZE, F_MULTIPORT, F_EMERG_WRITE = 0, 1, 2

DEVICE_READY, DEVICE_ADD, DEVICE_REMOVE, PORT_READY = 0, 1, 2, 3
CONSOLE_PORT, RESIZE, PORT_OPEN, PORT_NAME = 4, 5, 6, 7

CONFIG = struct.Struct("<HHII")          # cols, rows, max_nr_ports, emerg_wr
CONTROL = struct.Struct("<IHH")          # id, event, value
EMERG_WR_OFFSET = 8
QUEUE_SIZE, CONTROL_QUEUE_SIZE = 256, 32
EMERG_LIMIT = 64 * 1024
CONTROL_OUT_LIMIT = 256                  # device -> driver control messages waiting
LATEST_ONLY = (PORT_OPEN, RESIZE)        # a port's waiting one is replaced by a newer one
CONTROL_RX, CONTROL_TX = 2, 3            # control receiveq (device -> driver), transmitq


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
    restartable = True

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
        kw = {}
        if limit is not None:
            _check_buffer(limit)
            kw["limit"] = limit
        if log_size is not None:
            _check_log(log_size)
            kw["log_size"] = log_size
        self.ports = [ConsolePort(self, 0, open_console_backend(backend, **kw))]
        for i, (port_name, spec) in enumerate(ports.items(), start=1):
            self.ports.append(ConsolePort(self, i, open_console_backend(spec, **kw), port_name))
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
        self.keep_state()

    # -- a restart under a running guest (avatar_hw.state) ---------------------------------------

    def saved_state(self):
        """The multiport bring-up: DEVICE_ADDs sent, each port's guest side and what the
        driver was told of its host side, control messages not yet delivered."""
        return {"devices_added": self._devices_added,
                "control_out": [m.hex() for m in self._control_out],
                "ports": [[p.guest_ready, p.guest_open, p.host_open] for p in self.ports]}

    def restore_state(self, saved, words, live):
        if not live:                    # nothing of a console outlives a reset
            return
        ports = saved.get("ports", [])
        if len(ports) not in (0, len(self.ports)) or not all(
                isinstance(p, list) and len(p) == 3 for p in ports):
            raise ValueError(f"console state has {len(ports)} ports, the device "
                             f"{len(self.ports)}")
        messages = saved.get("control_out", [])
        if len(messages) > CONTROL_OUT_LIMIT:
            raise ValueError(f"{len(messages)} control messages waiting (limit "
                             f"{CONTROL_OUT_LIMIT})")
        self._devices_added = bool(saved.get("devices_added"))
        self._control_out.extend(bytes.fromhex(m) for m in messages)
        for port, (ready, is_open, host_open) in zip(self.ports, ports):
            port.guest_ready, port.guest_open = bool(ready), bool(is_open)
            port.host_open = None if host_open is None else bool(host_open)
        for port in self.ports:
            port.restore(words)

    def queue_reset(self, index):
        if index in self._port_by_queue:
            port, _ = self._port_by_queue[index]
            if index == port.rx_index:
                port.drop_rx()
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
        elif index == CONTROL_RX:
            self._flush_control()
        elif index == CONTROL_TX:
            self._read_control()

    def _host_side_changed(self, port):
        self._report_host_side(port)
        port.drain_tx()                           # who holds the output may have changed

    # -- configuration ---------------------------------------------------------------------------

    def write_config(self, offset, data):
        # offered is enough: "without initializing virtio queues, or even acknowledging the
        # feature" (5.3.4), for a driver's earliest boot
        if offset == EMERG_WR_OFFSET and self.features & bit(F_EMERG_WRITE):
            if any(data):                       # QEMU's set_config ignores emerg_wr = 0
                self._emergency_write(data[0])
            else:
                self.idle_trap()                # nothing is written
        else:
            super().write_config(offset, data)

    def _emergency_write(self, char):
        if self._emerg_held >= EMERG_LIMIT:
            self.counters["errors"] += 1
            self.idle_trap()                    # the byte is dropped: nothing is written
            return
        self._emerg_held += 1
        port = self.ports[0]
        port.backend.submit_bytes(bytes((char,)), EMERGENCY)
        port.drain_tx()

    def emergency_done(self, length, written=True):
        """``length`` emergency bytes left port 0's stream: written, or dropped at a reset."""
        self._emerg_held -= length
        if written:
            self.count(requests=0, bytes_from_guest=length)

    def resize(self, cols, rows):
        """New terminal size: config (F_SIZE) and, with multiport, a RESIZE message for port 0."""
        self.update_config(0, struct.pack("<HH", cols, rows))
        if self.has_feature(F_MULTIPORT):
            self._send_control(0, RESIZE, 0, struct.pack("<HH", rows, cols))

    # -- control queues (multiport), in the order of a driver's bring-up -------------------------
    #
    # driver -> device (control transmitq): DEVICE_READY, then per port PORT_READY, then
    # PORT_OPEN whenever the guest opens or closes the port.
    # device -> driver (control receiveq): DEVICE_ADD per port, CONSOLE_PORT / PORT_NAME /
    # PORT_OPEN in answer to PORT_READY, PORT_OPEN when the host side changes, RESIZE.

    def _read_control(self):
        """Handle each message the driver put in the control transmitq, in order."""
        queue = self.queues[CONTROL_TX]
        message = self._control_in
        for chain in queue:
            n = gather(chain.readable, message)
            queue.add_used(chain, 0)
            if n < CONTROL.size:
                self.guest_error("short control message (%d bytes); ignored", n)
                continue
            self._handle_control(*CONTROL.unpack(message))
        self.keep_state()
        self.signal_used(queue)

    def _handle_control(self, port_id, event, value):
        if event == DEVICE_READY:
            self._device_ready(value)
        elif port_id >= len(self.ports):
            self.guest_error("control event %d for unknown port %d; ignored", event, port_id)
        elif event == PORT_READY:
            self._port_ready(self.ports[port_id], value)
        elif event == PORT_OPEN:
            self._port_open(self.ports[port_id], value)
        else:
            self.guest_error("unexpected control event %d from the driver; ignored", event)

    def _device_ready(self, value):
        """DEVICE_READY: the driver is set up; announce every port (DEVICE_ADD), once."""
        if value != 1:
            self.guest_error("driver failed to set up (DEVICE_READY %d)", value)
            return
        if self._devices_added:
            self.guest_error("repeated DEVICE_READY; ignored")
            return
        self._devices_added = True
        for port in self.ports:
            self._send_control(port.id, DEVICE_ADD, 0)

    def _port_ready(self, port, value):
        """PORT_READY: the driver added the port; say what it is (CONSOLE_PORT for port 0,
        PORT_NAME for a named port) and whether its host side is open."""
        if value != 1:
            self.guest_error("driver could not add port %d", port.id)
            return
        if port.guest_ready:
            self.guest_error("repeated PORT_READY for port %d; ignored", port.id)
            return
        if port.id == 0:
            self._send_control(0, CONSOLE_PORT, 1)
            port.guest_open = True
        if port.name:
            self._send_control(port.id, PORT_NAME, 1, port.name.encode())
        port.guest_ready = True
        self._report_host_side(port)
        port.fill_rx()

    def _port_open(self, port, value):
        """PORT_OPEN from the driver: the guest side opened or closed (port 0 stays open)."""
        port.guest_open = bool(value) or port.id == 0
        port.fill_rx()

    def _report_host_side(self, port):
        """PORT_OPEN to the driver when the host side of a named port opens or closes.

        The console port (0) is always open; a named port is open while its
        backend has someone at the host end (a socket client, a pty's holder).
        While it is closed a Linux guest blocks writers and reads return EOF;
        output already queued is kept for the next client.
        """
        if not (port.guest_ready and self.active and self.has_feature(F_MULTIPORT)):
            return
        is_open = port.id == 0 or port.backend.connected
        if is_open != port.host_open:
            port.host_open = is_open
            self._send_control(port.id, PORT_OPEN, int(is_open))

    def _send_control(self, port_id, event, value, payload=b""):
        """Queue a message for the driver (bounded: a driver that takes none is failed). A
        PORT_OPEN or RESIZE replaces the port's one still waiting: only the latest state
        counts, and a host client connecting and leaving in a loop while the guest is slow
        to read filled the queue and failed the device."""
        if event in LATEST_ONLY:
            key = CONTROL.pack(port_id, event, 0)[:6]           # id, event
            waiting = [m for m in self._control_out if m[:6] == key]
            for message in waiting:
                self._control_out.remove(message)
        if len(self._control_out) >= CONTROL_OUT_LIMIT:
            self.guest_error("%d control messages wait for buffers in the control receiveq",
                             len(self._control_out))
            self.fail("the driver takes no control messages")
            return
        self._control_out.append(CONTROL.pack(port_id, event, value) + payload)
        self.keep_state()
        self._flush_control()

    def _flush_control(self):
        """Put waiting messages into the driver's control receiveq buffers."""
        if len(self.queues) <= CONTROL_RX:         # no MULTIPORT: no control queues
            return
        queue = self.queues[CONTROL_RX]
        if not (self.active and queue.ready):
            return
        completed = False
        while self._control_out:
            chain = queue.pop()
            if chain is None:
                break
            if not chain.writable_len:          # as a port's receiveq: the message waits
                self.guest_error("control receive buffer with no writable part; returned "
                                 "empty")
                queue.add_used(chain, 0)
                completed = True
                continue
            message = self._control_out.popleft()
            n = scatter(message, chain.writable)
            if n < len(message):
                self.guest_error("control buffer of %d bytes too small for a %d-byte "
                                 "message; truncated", chain.writable_len, len(message))
            queue.add_used(chain, n)
            completed = True
        if completed:
            self.keep_state()
            self.signal_used(queue)

    # -- introspection ----------------------------------------------------------------------------

    def info(self):
        out = super().info()
        out["ports"] = [{"id": p.id, "name": p.name, "guest_open": p.guest_open,
                         "host_open": bool(p.host_open),
                         "endpoints": [ep.url for ep in p.backend.endpoints],
                         "buffered": p.backend.buffered, "log": len(p.backend.log),
                         "log_overwritten": p.backend.log_overwritten,
                         "output_errors": sum(ep.output_errors for ep in p.backend.endpoints)}
                        for p in self.ports]
        return out



# -- the VMs config's console table ---------------------------------------------------------------

def _check_urls(value):
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, list) or not urls:
        check_url(None)                         # "must be a URL or a non-empty list ..."
    for url in urls:
        check_url(url)


def _urls_under(value, base):
    return url_under(value, base) if isinstance(value, str) else [url_under(u, base)
                                                                  for u in value]


def _check_ports(value):
    for name, urls in value.items():
        try:
            _check_urls(urls)
        except ValueError as err:
            raise ValueError(f"port {name!r}: {err}") from None


def _check_size(value):
    if (len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not all(0 < v < 0x10000 for v in value)):
        raise ValueError("must be [columns, rows], two integers from 1 to 65535")


MAX_BUFFER = MAX_LOG = 64 << 20      # bytes per port: held in flight; the unattached log
_check_buffer, _check_log = up_to(MAX_BUFFER, "64 MiB"), up_to(MAX_LOG, "64 MiB")


SCHEMA = Schema("console", (
    Field("endpoints", (str, list), REQUIRED, "a URL or a list of URLs", _check_urls,
          _urls_under, alias="backends"),
    Field("ports", dict, None, "a table of port name = URL(s)", _check_ports,
          lambda value, base: {name: _urls_under(urls, base) for name, urls in value.items()}),
    Field("size", list, None, "[columns, rows]", _check_size),
    Field("buffer", int, None, "bytes of guest output held in flight per port (1 to 64 MiB)",
          _check_buffer),
    Field("log", int, None, "bytes of output kept per port while no client is attached (1 to "
          "64 MiB)", _check_log),
))


def claims(options):
    """What the device must have to itself (avatar_hw.config): the paths of its ``pty:`` and
    ``unix:`` endpoints (a second would take the first's place)."""
    ports = [("endpoints", options["endpoints"])]
    ports += [("ports", urls) for urls in options.get("ports", {}).values()]
    for key, urls in ports:
        for url in [urls] if isinstance(urls, str) else urls:
            scheme, _, path = url.partition(":")
            if scheme in ("pty", "unix") and path:
                yield key, f"path {os.path.normpath(path)}", False


def from_config(options):
    """The device for a VMs config ``console`` table (checked by ``SCHEMA``)."""
    size = options.get("size")
    return ConsoleDevice(options["endpoints"], ports=options.get("ports"),
                         size=tuple(size) if size else None, limit=options.get("buffer"),
                         log_size=options.get("log"))
