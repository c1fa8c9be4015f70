"""The VMs config (VMS.toml): which devices each VM gets, as ``virtio_configure_vm`` does.

::

    [vm.0]
    console = { backends = ["pty:/run/avatar/vm0", "file:/var/log/avatar/vm0.log"] }

    [vm.1]
    console = { backends = ["unix:/run/avatar/vm1.sock"] }
    block = { image = "/srv/avatar/vm1.img", readonly = false }

Relative paths (``block.image``, ``net.switch``, the paths of ``file:``,
``pty:`` and ``unix:`` console endpoints) are relative to the daemon's working
directory: ``serve``'s current directory, the demo's temporary directory
(``base``). ``block.size`` creates a missing image (sparse) of that many bytes.

A device key holds a table, or an array of tables for several devices of one
kind. Devices get the VM's window slots in ``DEVICE_KINDS`` order (console,
block, rng, net), then in array order. Every mistake is a ``ConfigError``
naming the file, the key (``vm.1.block.readonly``) and the problem.

``DEVICE_KINDS`` is the registry: a kind's keys with their types, and the
factory (``"module:function"``, imported when a VM uses the kind) that turns
the checked options into a device. Adding a device kind is one entry.
"""

import importlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

_REQUIRED = object()


@dataclass(frozen=True)
class Key:
    kind: type | tuple          # accepted Python type(s) after TOML parsing
    default: object = None      # _REQUIRED: must be given
    what: str = ""              # for messages: "a string", "a list of URLs", ...
    check: object = None        # check(value) -> problem string or None
    path: object = None         # path(value, base) -> value with relative paths under base


@dataclass(frozen=True)
class DeviceKind:
    name: str
    keys: dict                  # key -> Key
    factory: str                # "module:function"(options dict) -> device
    one_of: tuple = ()          # exactly one of these keys must be given


@dataclass
class DeviceConfig:
    kind: str
    key: str                    # where it came from, e.g. "vm.1.block[0]"
    options: dict


@dataclass
class VmConfig:
    vm_id: int
    devices: list = field(default_factory=list)


@dataclass
class Config:
    path: Path
    vms: dict                   # vm_id -> VmConfig

    def build_device(self, device):
        """The device object for ``device`` (a ``DeviceConfig``); errors name file and key."""
        kind = DEVICE_KINDS[device.kind]
        module_name, _, function = kind.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError):
            raise ConfigError(self.path, device.key,
                              f"{device.kind} devices are not available in this avatar-hw "
                              f"({kind.factory} is missing)") from None
        try:
            return factory(device.options)
        except ConfigError as err:
            raise ConfigError(self.path, device.key, f"{err.file}: {err.problem}") from None
        except (OSError, ValueError) as err:
            raise ConfigError(self.path, device.key, str(err)) from None


# -- checks shared by the kinds ------------------------------------------------------------------

def _urls(value):
    urls = [value] if isinstance(value, str) else value
    if not urls or not all(isinstance(u, str) and u for u in urls):
        return "must be a URL or a non-empty list of URLs such as \"pty:/run/avatar/vm0\""
    bad = [u for u in urls if ":" not in u and u != "stdio"]
    if bad:
        return f"{bad[0]!r} is not a URL (scheme:rest, e.g. file:/var/log/avatar/vm0.log)"
    return None


PATH_SCHEMES = ("file", "pty", "unix")


def _under(path, base):
    return str(Path(base, path)) if path and not Path(path).is_absolute() else path


def _url_under(url, base):
    scheme, sep, rest = url.partition(":")
    return f"{scheme}:{_under(rest, base)}" if sep and scheme in PATH_SCHEMES else url


def _urls_under(value, base):
    if isinstance(value, str):
        return _url_under(value, base)
    return [_url_under(url, base) for url in value]


def _ports_under(value, base):
    return {name: _urls_under(urls, base) for name, urls in value.items()}


def _size(value):
    if (len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not all(0 < v < 0x10000 for v in value)):
        return "must be [columns, rows], two integers from 1 to 65535"
    return None


def _ports(value):
    for name, urls in value.items():
        problem = _urls(urls)
        if problem:
            return f"port {name!r}: {problem}"
    return None


def _positive(value):
    return None if value > 0 else f"must be positive, not {value}"


def _mac(value):
    parts = value.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                  for p in parts):
        return f"{value!r} is not a MAC address like 52:54:00:12:34:56"
    return None


def _console(options):
    from .devices.console import ConsoleDevice
    size = options.get("size")
    return ConsoleDevice(backend=options["backends"], ports=options.get("ports"),
                         size=tuple(size) if size else None, limit=options.get("buffer"),
                         log_size=options.get("log"))


_URLS = Key((str, list), _REQUIRED, "a URL or a list of URLs", _urls, _urls_under)

DEVICE_KINDS = {kind.name: kind for kind in (
    DeviceKind("console", {
        "backends": _URLS,
        "ports": Key(dict, None, "a table of port name = URL(s)", _ports, _ports_under),
        "size": Key(list, None, "[columns, rows]", _size),
        "buffer": Key(int, None, "bytes of guest output held in flight per port", _positive),
        "log": Key(int, None, "bytes of output kept per port while no client is attached",
                   _positive),
    }, factory="avatar_hw.config:_console"),
    DeviceKind("block", {
        "image": Key(str, _REQUIRED, "the path of a raw image or block device", path=_under),
        "size": Key(int, None, "bytes: create the image (sparse) if it does not exist",
                    _positive),
        "readonly": Key(bool, False, "true or false"),
        "serial": Key(str, None, "a string (up to 20 bytes)",
                      lambda v: None if len(v.encode()) <= 20 else "is longer than 20 bytes"),
        "queues": Key(int, None, "the number of request queues", _positive),
    }, factory="avatar_hw.devices.block:from_config"),
    DeviceKind("rng", {
        "max_bytes": Key(int, None, "bytes per request", _positive),
        "rate": Key(int, None, "bytes per second", _positive),
    }, factory="avatar_hw.devices.rng:from_config"),
    DeviceKind("net", {
        "tap": Key(str, None, "a TAP interface name"),
        "switch": Key(str, None, "the path of a datagram switch socket", path=_under),
        "mac": Key(str, None, "a MAC address", _mac),
        "mtu": Key(int, None, "bytes", _positive),
    }, factory="avatar_hw.devices.net:from_config", one_of=("tap", "switch")),
)}

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
               dict: "a table"}


def _type_ok(value, kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def _device_options(file, key, kind, table, base=None):
    if not isinstance(table, dict):
        raise ConfigError(file, key, f"must be a table such as {{ {next(iter(kind.keys))} = "
                                     "... }}")
    unknown = sorted(set(table) - set(kind.keys))
    if unknown:
        raise ConfigError(file, f"{key}.{unknown[0]}",
                          f"unknown key for a {kind.name}; expected one of "
                          f"{', '.join(kind.keys)}")
    if kind.one_of and sum(k in table for k in kind.one_of) != 1:
        raise ConfigError(file, key, f"needs exactly one of {' or '.join(kind.one_of)}")
    options = {}
    for name, spec in kind.keys.items():
        if name not in table:
            if spec.default is _REQUIRED:
                raise ConfigError(file, f"{key}.{name}", f"missing; it must be {spec.what}")
            if spec.default is not None:
                options[name] = spec.default
            continue
        value = table[name]
        if not _type_ok(value, spec.kind):
            raise ConfigError(file, f"{key}.{name}",
                              f"must be {spec.what or _TYPE_NAMES[spec.kind]}, not "
                              f"{type(value).__name__} {value!r}")
        problem = spec.check(value) if spec.check else None
        if problem:
            raise ConfigError(file, f"{key}.{name}", problem)
        options[name] = spec.path(value, base) if spec.path and base is not None else value
    return options


def _vm(file, key, vm_id, table, base=None):
    if not isinstance(table, dict):
        raise ConfigError(file, key, "must be a table of devices, e.g. [vm.0] with "
                                     "console = { backends = [...] }")
    unknown = sorted(set(table) - set(DEVICE_KINDS))
    if unknown:
        raise ConfigError(file, f"{key}.{unknown[0]}",
                          f"unknown device kind; expected one of {', '.join(DEVICE_KINDS)}")
    vm = VmConfig(vm_id)
    for kind in DEVICE_KINDS.values():
        if kind.name not in table:
            continue
        entries = table[kind.name]
        dev_key = f"{key}.{kind.name}"
        if isinstance(entries, list):
            if not entries:
                raise ConfigError(file, dev_key, "an empty list: give a table, or remove the key")
            keyed = [(f"{dev_key}[{i}]", entry) for i, entry in enumerate(entries)]
        else:
            keyed = [(dev_key, entries)]
        for where, entry in keyed:
            vm.devices.append(DeviceConfig(kind.name, where,
                                           _device_options(file, where, kind, entry, base)))
    if not vm.devices:
        raise ConfigError(file, key, "no devices; give at least one of "
                                     f"{', '.join(DEVICE_KINDS)}")
    return vm


def parse_config(file, data, *, max_vms=None, devices_per_vm=None, base=None):
    """A ``Config`` from parsed TOML ``data``; ``max_vms`` bounds the VM numbers,
    ``devices_per_vm`` the devices of one VM (its window's slots); relative paths are
    put under ``base`` when given (else left relative to the working directory)."""
    unknown = sorted(set(data) - {"vm"})
    if unknown:
        raise ConfigError(file, unknown[0], "unknown table; VMs are [vm.0], [vm.1], ...")
    vms_table = data.get("vm")
    if not isinstance(vms_table, dict) or not vms_table:
        raise ConfigError(file, "vm", "no VMs; add [vm.0] with at least a console")
    vms = {}
    for name, table in vms_table.items():
        key = f"vm.{name}"
        if not name.isdigit() or (len(name) > 1 and name.startswith("0")):
            raise ConfigError(file, key, "VM names are their numbers: vm.0, vm.1, ...")
        vm_id = int(name)
        if max_vms is not None and vm_id >= max_vms:
            raise ConfigError(file, key, f"the board has VMs 0..{max_vms - 1}")
        vms[vm_id] = _vm(file, key, vm_id, table, base)
        if devices_per_vm is not None and len(vms[vm_id].devices) > devices_per_vm:
            raise ConfigError(file, key, f"{len(vms[vm_id].devices)} devices, but the board "
                                         f"has {devices_per_vm} device slots per VM")
    return Config(Path(file), dict(sorted(vms.items())))


def load_config(path, *, max_vms=None, devices_per_vm=None, base=None):
    """Read and check a VMs config file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, None, "no such VMs config file") from None
    except OSError as err:
        raise ConfigError(path, None, f"cannot read: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(path, None, f"not a TOML file: {err}") from None
    return parse_config(path, data, max_vms=max_vms, devices_per_vm=devices_per_vm, base=base)
