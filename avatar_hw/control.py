"""The daemon's control socket: every ``avatar-hw`` command that talks to a running
daemon asks through it (``list``, ``info``, ``debug``: avatar_hw.commands.query;
``balloon``, ``screenshot``, ``inject``: their modules in avatar_hw.commands).

A Unix stream socket speaking JSON lines: each request is one line
``{"command": NAME, ...}`` (the commands below), each answer one line
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``.
The server lives in the daemon's event loop (non-blocking, answers queued
per client), so introspection never stalls trap service.

Commands (the seed's list-all / print-info / debug-device):

- ``list``: one entry per device: VM, slot, name, window, IRQ, status;
- ``info``: the daemon, the trap page counters, and per VM its RAM and
  devices with status bits, negotiated features, queues, interrupts raised,
  bytes moved and errors;
- ``debug`` (``vm``, ``device``: a slot number or a name such as
  ``console`` or ``console0``): everything about one device;
- ``balloon`` (``vm``, optional ``size``: bytes or text such as ``"384M"``): the guest
  memory VM ``vm`` keeps (its balloon takes the rest); the balloon's state.
- ``screenshot`` (``vm``, ``device``, default ``gpu``): the GPU's scanout as a PNG,
  ``{"width", "height", "png"}`` with the file in base64. The loop only copies the
  pixels; a thread encodes them (a large screen takes a second), one screenshot at
  a time, and the client's later requests wait for its answer.

Fault injection (avatar_hw.faults; docs/testing.md, "Fault injection"):

- ``inject`` (``vm``, ``device``, ``fault``, ``options``: a dict of the fault's
  options): arm a fault on one device; the answer describes it;
- ``pause`` (``seconds``): serve no trap for that long;
- ``clear`` (optional ``vm``, ``device``): disarm faults; the answer is how many;
- ``faults``: every armed fault with how often it matched and fired.
"""

import base64
import collections
import json
import logging
import os
import socket
import stat
from concurrent.futures import ThreadPoolExecutor

from . import paths, png
from .errors import AvatarError, os_reason
from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
MAX_CLIENTS = 64
LINES_PER_TURN = 8          # a client's requests answered in one loop turn
ACCEPT_PAUSE = 0.1          # seconds without accepting when the daemon has no descriptor left
ENV = "AVATAR_HW_CONTROL"


def default_control_path():
    """$AVATAR_HW_CONTROL, else /run/avatar-hw.sock for root, else a per-user path."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    if os.geteuid() == 0:
        return "/run/avatar-hw.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "avatar-hw.sock")
    return f"/tmp/avatar-hw-{os.getuid()}.sock"


def add_control_option(parser):
    """The clients' ``--control PATH`` option (``parser``: an argparse parser or group)."""
    parser.add_argument("--control", help=f"the daemon's control socket (default ${ENV} or "
                                          f"{default_control_path()})")


# -- server ----------------------------------------------------------------------------------------

class _Client:
    def __init__(self, sock):
        self.sock = sock
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.waiting = False            # for a screenshot: its next requests wait
        self.later = None               # the loop's handle of a serve in the next turn


def _encode(shot):
    """The ``screenshot`` answer for a ``Capture`` (run by the encoder thread)."""
    data = png.encode(shot.width, shot.height, shot.rgb_rows())
    return {"ok": True, "result": {"width": shot.width, "height": shot.height,
                                   "png": base64.b64encode(data).decode()}}


class ControlServer:
    """Serves ``daemon`` (``info()``, ``subsystem``) on a Unix socket at ``path``.

    A client costs the loop a bounded turn and the daemon bounded memory, whatever it
    sends: at most ``MAX_CLIENTS`` at once, ``LINES_PER_TURN`` of its requests answered a
    loop turn, and nothing more read from it while an answer waits to be sent (or for a
    screenshot) or a whole request waits to be answered."""

    def __init__(self, path, daemon):
        self.path = str(path)
        self.daemon = daemon
        self.loop = None
        self._clients = {}
        self._screenshots = collections.deque()     # (client, vm, slot) not begun
        self._encoding = None                       # (client, future) being encoded
        self._accept_later = None
        self._log = RateLimitedLog(log)
        self.sock = _listen(self.path)
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="avatar-hw-png")
        self._encoded = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def attach(self, loop):
        self.loop = loop
        loop.add_reader(self.sock, self._accept)
        loop.add_reader(self._encoded, self._screenshot_done)

    def close(self):
        for client in list(self._clients.values()):
            self._drop(client)
        if self.loop is not None:
            self.loop.remove_reader(self.sock)
            self.loop.remove_reader(self._encoded)
            if self._accept_later is not None:
                self.loop.cancel(self._accept_later)
        # a running encode ends first: its done callback writes the eventfd
        self._encoder.shutdown(wait=True, cancel_futures=True)
        os.close(self._encoded)
        self.sock.close()
        paths.remove(self.path)

    def _accept(self):
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:              # out of descriptors: try again in a while
            self._log("control socket: cannot accept a client (%s); pausing %.1f s",
                      os_reason(err), ACCEPT_PAUSE)
            self.loop.remove_reader(self.sock)
            self._accept_later = self.loop.call_later(ACCEPT_PAUSE, self._accept_again)
            return
        if len(self._clients) >= MAX_CLIENTS:
            self._log("control socket: %d clients already; one more refused", MAX_CLIENTS)
            try:
                conn.send(json.dumps({"ok": False, "error": f"{MAX_CLIENTS} clients are "
                                      "connected already; try again"}).encode() + b"\n",
                          socket.MSG_DONTWAIT)
            except OSError:
                pass
            conn.close()
            return
        conn.setblocking(False)
        client = _Client(conn)
        self._clients[conn.fileno()] = client
        self.loop.add_reader(conn, lambda: self._readable(client))

    def _accept_again(self):
        self._accept_later = None
        self.loop.add_reader(self.sock, self._accept)

    def _here(self, client):
        return self._clients.get(client.sock.fileno()) is client

    def _drop(self, client):
        fd = client.sock.fileno()
        self._clients.pop(fd, None)
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        if client.later is not None:
            self.loop.cancel(client.later)
            client.later = None
        client.sock.close()

    def _readable(self, client):
        try:
            data = client.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.inbox += data
        self._serve(client)

    def _serve(self, client):
        """Answer up to ``LINES_PER_TURN`` of ``client``'s whole lines in order, until one
        waits for a screenshot or an answer cannot be sent at once; the rest next turn."""
        if client.later is not None:            # called before its timer: one serve a turn
            self.loop.cancel(client.later)
            client.later = None
        if not self._here(client):
            return
        for _ in range(LINES_PER_TURN):
            if client.waiting or client.outbox or b"\n" not in client.inbox:
                break
            line, _, rest = bytes(client.inbox).partition(b"\n")
            client.inbox[:] = rest
            reply = self.answer(line)
            if isinstance(reply, tuple):                    # (vm, slot) of a screenshot
                client.waiting = True
                self._screenshots.append((client, *reply))
                self._next_screenshot()
            else:
                self._send(client, reply)
            if not self._here(client):
                return
        if b"\n" not in client.inbox and len(client.inbox) > MAX_REQUEST:
            client.inbox.clear()
            self._send(client, {"ok": False, "error": "request line too long"})
            if not self._here(client):
                return
        self._watch(client)

    def _watch(self, client):
        """Read from ``client`` only when nothing of it is pending; serve its next lines
        in the next turn when they can be."""
        busy, line = client.waiting or client.outbox, b"\n" in client.inbox
        if busy or line:
            self.loop.remove_reader(client.sock)
        else:
            self.loop.add_reader(client.sock, lambda: self._readable(client))
        if line and not busy and client.later is None:
            client.later = self.loop.call_later(0, lambda: self._serve(client))

    def _next_screenshot(self):
        """Copy the next waiting screenshot's pixels and hand them to the encoder."""
        while self._encoding is None and self._screenshots:
            client, vm, slot = self._screenshots.popleft()
            if not self._here(client):
                continue                                    # it left
            try:
                shot = self.daemon.screenshot(vm, slot)
            except ValueError as err:
                self._answered(client, {"ok": False, "error": f"bad request: {err}"})
                continue
            future = self._encoder.submit(_encode, shot)
            self._encoding = client, future
            future.add_done_callback(lambda _: os.eventfd_write(self._encoded, 1))

    def _screenshot_done(self):
        try:
            os.eventfd_read(self._encoded)
        except BlockingIOError:
            return
        client, future = self._encoding
        self._encoding = None
        try:
            reply = future.result()
        except Exception as err:            # introspection must never stop the daemon
            log.exception("screenshot failed")
            reply = {"ok": False, "error": f"internal error: {err!r}"}
        if self._here(client):
            self._answered(client, reply)
        self._next_screenshot()

    def _answered(self, client, reply):
        """Send a screenshot's ``reply``; what ``client`` asked after it is served from the
        next turn (never from inside a ``_serve``: its lines are a turn's at most)."""
        client.waiting = False
        self._send(client, reply)
        if self._here(client):
            self._watch(client)

    def _send(self, client, reply):
        had_output = bool(client.outbox)
        client.outbox += json.dumps(reply).encode() + b"\n"
        if not had_output:
            self._writable(client)

    def _writable(self, client):
        try:
            sent = client.sock.send(client.outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(client)
            return
        del client.outbox[:sent]
        if client.outbox:
            self.loop.add_writer(client.sock, lambda: self._writable(client))
        else:
            self.loop.remove_writer(client.sock)
            self._watch(client)

    def answer(self, line):
        """The reply (a dict) to one request line, or the ``(vm, slot)`` of a screenshot to
        take; never raises."""
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError('a request is a JSON object, e.g. {"command": "list"}')
            command = request.get("command")
            if not isinstance(command, str):
                raise ValueError('missing key "command" (a string: list, info, debug, ...)'
                                 if command is None else '"command" must be a string')
            needs = {"balloon": ("vm",), "debug": ("vm", "device"), "screenshot": ("vm",),
                     "inject": ("vm", "device", "fault"), "pause": ("seconds",)}
            missing = [key for key in needs.get(command, ()) if key not in request]
            if missing:
                raise ValueError(f'missing key "{missing[0]}" ({command} takes '
                                 f'{", ".join(needs[command])})')
            vm = request.get("vm")
            if vm is not None and (type(vm) is not int or vm < 0):
                raise ValueError(f'"vm" must be a VM number (0, 1, ...), not {json.dumps(vm)}')
            if command == "list":
                result = self.daemon.list_devices()
            elif command == "info":
                result = self.daemon.info()
            elif command == "balloon":
                result = self.daemon.balloon(vm, request.get("size"))
            elif command == "debug":
                result = self.daemon.debug_device(vm, self._slot(vm, str(request["device"])))
            elif command == "screenshot":                 # answered by _next_screenshot
                return vm, self._slot(vm, str(request.get("device", "gpu")))
            elif command in ("inject", "pause", "clear", "faults"):
                result = self._fault_command(command, request)
            else:
                return {"ok": False, "error": f"unknown command {command!r}"}
            return {"ok": True, "result": result}
        except (ValueError, KeyError, TypeError, OverflowError) as err:
            return {"ok": False, "error": f"bad request: {err}"}
        except RecursionError:
            return {"ok": False, "error": "bad request: nested too deeply"}
        except AvatarError as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:          # introspection must never stop the daemon
            self._log("control request %r failed", line[:200], exc_info=True)
            return {"ok": False, "error": f"internal error: {err!r}"}

    def _fault_command(self, command, request):
        faults = self.daemon.faults
        if command == "pause":
            seconds = request["seconds"]
            if type(seconds) not in (int, float) or not 0 < seconds <= 3600:
                raise ValueError(f"pause of {json.dumps(seconds)} s: give 0 < seconds <= 3600")
            self.daemon.pause(seconds)
            return {"paused": seconds}
        if command == "faults":
            return faults.describe()
        vm = request.get("vm")
        if request.get("device") is not None and vm is None:
            raise ValueError('missing key "vm" (clear takes a device with its vm)')
        slot = None if request.get("device") is None else self._slot(vm, str(request["device"]))
        if vm is not None and slot is None:
            self._entries(vm)                    # clear of a VM that is not here: an error
        if command == "clear":                   # of everything: a pause too
            return {"cleared": faults.clear(vm, slot),
                    "pause_ended": vm is None and self.daemon.end_pause()}
        options = request.get("options") or {}
        if not isinstance(options, dict):
            raise TypeError("options must be an object")
        return faults.inject(vm, slot, str(request["fault"]), **options)

    def _entries(self, vm_id):
        """The ``list`` entries of VM ``vm_id``'s devices; ValueError when it has none here."""
        devices = self.daemon.list_devices()
        entries = [e for e in devices if e["vm"] == vm_id]
        if not entries:
            vms = sorted({e["vm"] for e in devices})
            raise ValueError(f"no VM {vm_id} here (VMs: {', '.join(map(str, vms)) or 'none'})")
        return entries

    def _slot(self, vm_id, device):
        """A slot number from ``device``: ``"1"``, ``"console"`` (first of that name),
        ``"console1"``; ValueError when VM ``vm_id`` has no such device."""
        entries = self._entries(vm_id)
        number = int(device) if device.isascii() and device.isdigit() else None
        for entry in entries:
            if entry["slot"] == number or device in (entry["name"],
                                                     f"{entry['name']}{entry['slot']}"):
                return entry["slot"]
        names = ", ".join(f"{e['name']}{e['slot']}" for e in entries) or "none"
        raise ValueError(f"VM {vm_id} has no device {device!r} (it has: {names})")


def _listen(path):
    problem = paths.clear_for_socket(path)       # a socket left by a daemon that died goes
    if problem == paths.IN_USE:
        raise AvatarError(f"control socket {path} is in use by a running avatar-hw: stop it "
                          "or give this one another --control path")
    if problem:
        raise AvatarError(f"control socket {path} {problem}: give another --control path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise AvatarError(f"control socket {path}: {os_reason(err)}; give a writable "
                          "--control path") from None
    os.chmod(path, 0o660)
    sock.listen(8)
    sock.setblocking(False)
    return sock


# -- client ----------------------------------------------------------------------------------------

def _not_a_socket(path):
    """Whether something other than a socket is at ``path`` (a connect to a file or a
    directory is refused, as one to a socket nobody serves)."""
    try:
        return not stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def request(command, path=None, timeout=5.0, option="--control", **arguments):
    """Ask the daemon at ``path``; returns the result or raises ``AvatarError`` (one line).

    ``option``: what the user calls the path (the pytest plugin's ``--avatar-control``)."""
    path = path or default_control_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps({"command": command, **arguments}).encode() + b"\n")
        reply = bytearray()
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        if _not_a_socket(path):
            raise AvatarError(f"{path} {paths.NOT_A_SOCKET}, so not an avatar-hw daemon's "
                              f"control socket: give the daemon's with {option} (is "
                              "'avatar-hw serve' running?)") from None
        raise AvatarError(f"no avatar-hw daemon at {path}: is 'avatar-hw serve' running? "
                          f"(give its control socket with {option})") from None
    except PermissionError:
        raise AvatarError(f"{path}: permission denied; run as the daemon's user or root") from None
    except OSError as err:
        raise AvatarError(f"control socket {path}: {err}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(reply)
    except ValueError:
        raise AvatarError(f"control socket {path}: the daemon closed without answering") from None
    if not answer.get("ok"):
        raise AvatarError(f"daemon: {answer.get('error')}")
    return answer["result"]
