"""The VMs config (VMS.toml): which devices each VM gets, as ``virtio_configure_vm`` does.

::

    [vm.0]
    console = { endpoints = ["pty:/run/avatar/vm0", "file:/var/log/avatar/vm0.log"] }

    [vm.1]
    console = { endpoints = ["unix:/run/avatar/vm1.sock"] }
    block = { image = "/srv/avatar/vm1.img", readonly = false }

Relative paths (the fields with ``path=under``: ``block.image``, ``net.switch``,
``9p.path``, ``vsock.socket``, ``fs.shared_dir``, ``vhost_user.socket``, the paths of
``file:``, ``pty:`` and ``unix:`` console endpoints) are relative to the daemon's working
directory: ``serve``'s current directory, the demo's temporary directory (``base``).
``block.size`` creates a missing image (sparse) of that many bytes.

A device key holds a table, or an array of tables for several devices of one
kind. Devices get the VM's window slots in ``DEVICES`` order (console, block,
rng, net, balloon, 9p, vsock, gpu, fs,
vhost_user), then in array order. Every mistake is a ``ConfigError`` naming the
file, the key (``vm.1.block.readonly``) and the problem.

``DEVICES`` is the registry (kvmtool's ``virtio_ops``): a kind's module, imported
when a VM uses the kind. The module exports ``SCHEMA`` (its keys, each with type,
default, check and help: ``avatar_hw.schema``) and ``from_config(options)``, which
turns the checked options into a device; it may also give ``claims(options)`` (what no other
device may have: a path, a mount tag; ``_check_claims``) and ``ONE_PER_VM`` (why a VM has
at most one). Adding a device is one module and one line here.
"""

import contextlib
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .errors import AvatarError, ConfigError, os_reason
from .schema import read_toml
from .shipped import names_a_path, shipped_file

DEVICES = {
    "console": "avatar_hw.devices.console",
    "block": "avatar_hw.devices.block",
    "rng": "avatar_hw.devices.rng",
    "net": "avatar_hw.devices.net",
    "balloon": "avatar_hw.devices.balloon",
    "9p": "avatar_hw.devices.p9",
    "vsock": "avatar_hw.devices.vsock",
    "gpu": "avatar_hw.devices.gpu",
    "fs": "avatar_hw.devices.fs",
    "vhost_user": "avatar_hw.devices.vhost_user",
}


def device_module(file, key, kind):
    """The module of device ``kind`` (``DEVICES``); a ConfigError at ``key`` if it is missing."""
    try:
        return importlib.import_module(DEVICES[kind])
    except ImportError:
        raise ConfigError(file, key, f"{kind} devices are not available in this avatar-hw "
                                     f"({DEVICES[kind]} is missing)") from None


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
        module = device_module(self.path, device.key, device.kind)
        with self._naming(device):
            return module.from_config(device.options)

    def check_access(self, device, built):
        """``built.check_access()`` (a device built from ``device``), its error naming file and
        key: the daemon's check once ``--user`` has changed the user."""
        with self._naming(device):
            built.check_access()

    @contextlib.contextmanager
    def _naming(self, device):
        """A device's errors as one ``ConfigError`` naming the file and ``device``'s key."""
        try:
            yield
        except ConfigError as err:
            raise ConfigError(self.path, device.key, f"{err.file}: {err.problem}") from None
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            raise ConfigError(self.path, device.key, where + os_reason(err)) from None
        except ValueError as err:
            raise ConfigError(self.path, device.key, str(err)) from None


def _vm(file, key, vm_id, table, base=None):
    if not isinstance(table, dict):
        raise ConfigError(file, key, "must be a table of devices, e.g. [vm.0] with "
                                     "console = { endpoints = [...] }")
    unknown = sorted(set(table) - set(DEVICES))
    if unknown:
        raise ConfigError(file, f"{key}.{unknown[0]}",
                          f"unknown device kind; expected one of {', '.join(DEVICES)}")
    vm = VmConfig(vm_id)
    for kind in DEVICES:
        if kind not in table:
            continue
        entries = table[kind]
        dev_key = f"{key}.{kind}"
        module = device_module(file, dev_key, kind)
        if isinstance(entries, list):
            if not entries:
                raise ConfigError(file, dev_key, "an empty list: give a table, or remove the key")
            if len(entries) > 1 and hasattr(module, "ONE_PER_VM"):
                raise ConfigError(file, f"{dev_key}[1]", f"a VM has at most one {kind} device "
                                                         f"({module.ONE_PER_VM})")
            keyed = [(f"{dev_key}[{i}]", entry) for i, entry in enumerate(entries)]
        else:
            keyed = [(dev_key, entries)]
        for where, entry in keyed:
            vm.devices.append(DeviceConfig(kind, where,
                                           module.SCHEMA.read(file, where, entry, base)))
    if not vm.devices:
        raise ConfigError(file, key, f"no devices; give at least one of {', '.join(DEVICES)}")
    return vm


def parse_config(file, data, *, max_vms=None, devices_per_vm=None, base=None):
    """A ``Config`` from parsed TOML ``data``; ``max_vms`` bounds the VM numbers,
    ``devices_per_vm`` the devices of one VM (its window's slots); relative paths are
    put under ``base`` when given (else left relative to the working directory)."""
    if "board" in data and "vm" not in data:
        raise ConfigError(file, None, "a board file (for --board), not a VMs config; VMs are "
                                      "[vm.0], [vm.1], ... (example: --config vms-example)")
    unknown = sorted(set(data) - {"vm"})
    if unknown:
        raise ConfigError(file, unknown[0], "unknown table; VMs are [vm.0], [vm.1], ...")
    vms_table = data.get("vm")
    if not isinstance(vms_table, dict) or not vms_table:
        raise ConfigError(file, "vm", "no VMs; add [vm.0] with at least a console")
    vms = {}
    for name, table in vms_table.items():
        key = f"vm.{name}"
        if not (name.isascii() and name.isdigit()) or (len(name) > 1 and name.startswith("0")):
            raise ConfigError(file, key, "VM names are their numbers: vm.0, vm.1, ...")
        vm_id = int(name)
        if max_vms is not None and vm_id >= max_vms:
            raise ConfigError(file, key, f"the board has VMs 0..{max_vms - 1}")
        vms[vm_id] = _vm(file, key, vm_id, table, base)
        if devices_per_vm is not None and len(vms[vm_id].devices) > devices_per_vm:
            raise ConfigError(file, key, f"{len(vms[vm_id].devices)} devices, but the board "
                                         f"has {devices_per_vm} device slots per VM")
    _check_claims(file, vms)
    return Config(Path(file), dict(sorted(vms.items())))


class Matching(NamedTuple):
    """A claim on every thing ``pattern`` matches in full; ``what`` says what they are to
    their claimant (the paths a vsock's guest connects to)."""
    pattern: re.Pattern
    what: str


def _check_claims(file, vms):
    """No two devices claim one thing: a device module's ``claims(options)`` gives ``(key,
    thing, per_vm)`` for each thing it must have to itself, in its VM or on the board; a
    ``thing`` that is a ``Matching`` claims every thing it matches."""
    owners, matchings = {}, []
    for vm in vms.values():
        for device in vm.devices:
            claims = getattr(device_module(file, device.key, device.kind), "claims", None)
            for key, thing, per_vm in claims(device.options) if claims else ():
                scope = vm.vm_id if per_vm else None
                if isinstance(thing, Matching):
                    matchings.append((scope, thing, device.key))
                    continue
                if (scope, thing) in owners:
                    owner, _ = owners[scope, thing]
                    whose = "given twice" if owner == device.key else f"also {owner}'s"
                    raise ConfigError(file, f"{device.key}.{key}", f"{thing} is {whose}; "
                                                                   f"give each its own {key}")
                owners[scope, thing] = device.key, key
    for scope, matching, owner in matchings:
        for (thing_scope, thing), (device, key) in owners.items():
            if thing_scope == scope and device != owner and matching.pattern.fullmatch(thing):
                raise ConfigError(file, f"{device}.{key}", f"{thing} is also {owner}'s "
                                                           f"({matching.what}); choose another")


def load_config(path, *, max_vms=None, devices_per_vm=None, base=None):
    """Read and check a VMs config file."""
    path = Path(path)
    data = read_toml(path, "VMs config file")
    return parse_config(path, data, max_vms=max_vms, devices_per_vm=devices_per_vm, base=base)


def config_path(text):
    """``--config`` as given, or a shipped VMs config's name (``vms-example``: the example
    installed beside the board files), as ``--board`` takes ``rpi4``."""
    if text is None or names_a_path(text):
        return text
    try:
        return str(shipped_file(f"{text}.toml"))
    except AvatarError:
        return text                     # load_config names the missing file
