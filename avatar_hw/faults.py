"""Fault injection: one ``FaultPlan`` per device, consulted at four hook points.

A test (``avatar-hw inject``, the control socket's ``inject``, the pytest plugin's
``avatar_board.inject``) arms faults on one device; the device's ``DeviceContext``
then holds that device's ``FaultPlan`` in ``faults`` (None when nothing is armed:
each hook is one ``is not None`` test, so an unarmed daemon pays nothing). The
hooks, one per place where a device meets its guest or its backend:

- ``block_request(write, sector, length)``: the block device, after a request's
  header is read (``ioerr``, ``torn``);
- ``interrupt(bits)``: ``DeviceContext.interrupt``, before InterruptStatus is set
  (``irq-drop``, ``irq-delay``; any device);
- ``output_stalled(resume)``: a console port before it takes transmit buffers
  (``stall``);
- ``frame(direction)``: the net device per transmitted or received frame (``drop``,
  ``corrupt``, ``delay``).

``FAULTS`` lists every fault: the devices it applies to and its options, each
checked when it is armed (an error names the option). What the guest sees of each
is in docs/testing.md, "Fault injection". The daemon-wide pause is not a device
fault: ``Daemon.pause(seconds)``.
"""

import random
import re
import time

from .errors import AvatarError

ANY = None          # a fault every device can take


class Option:
    def __init__(self, name, kind, default, text, check=None):
        self.name, self.kind, self.default, self.text, self.check = name, kind, default, text, check

    def read(self, fault, value):
        if value is None:
            return self.default
        try:
            value = self.kind(value)
        except (TypeError, ValueError):
            raise AvatarError(f"fault {fault}: option {self.name} = {value!r}: expected "
                              f"{self.text}") from None
        if self.check is not None and not self.check(value):
            raise AvatarError(f"fault {fault}: option {self.name} = {value!r}: expected "
                              f"{self.text}")
        return value


def _integer(value):
    """An integer option: an int or its ASCII digits; a fraction (2.9) or other digits
    (full-width ones) are an error, not a number."""
    if isinstance(value, (bool, float)) or (
            isinstance(value, str) and not re.fullmatch(r"\s*[0-9]+\s*", value)):
        raise ValueError(value)
    return int(value)


def _sectors(value):
    """``"FIRST-LAST"``, ``"SECTOR"`` or a (first, last) pair: an inclusive sector range."""
    if isinstance(value, str):
        first, dash, last = value.partition("-")
        value = (first, last if dash else first)
    first, last = (_integer(v) for v in value)
    if not 0 <= first <= last:
        raise ValueError(value)
    return first, last


_COUNT = Option("count", _integer, None, "a number of times >= 1 (default: until cleared)",
                lambda v: v >= 1)
_AFTER = Option("after", _integer, 0, "a number of matching events to let pass first (>= 0)",
                lambda v: v >= 0)
_PICK = (Option("probability", float, None, "a probability in 0..1", lambda v: 0 <= v <= 1),
         Option("every", _integer, None, "N >= 1: every Nth frame", lambda v: v >= 1),
         Option("seed", _integer, 0, "an integer RNG seed"),
         Option("direction", str, "both", "tx, rx or both", lambda v: v in ("tx", "rx", "both")))

# fault -> (devices it applies to, its options)
FAULTS = {
    "ioerr": (("block",), (
        Option("sectors", _sectors, None, "FIRST-LAST (inclusive sectors) or one sector"),
        Option("op", str, "any", "read, write or any", lambda v: v in ("read", "write", "any")),
        _AFTER, _COUNT)),
    "torn": (("block",), (
        Option("sectors", _sectors, None, "FIRST-LAST (inclusive sectors) or one sector"),
        Option("keep", _integer, 0, "the bytes of the write that reach the image (>= 0)",
               lambda v: v >= 0),
        _AFTER, _COUNT)),
    "irq-drop": (ANY, (_AFTER, Option("count", _integer, 1, "a number of interrupts >= 1",
                                      lambda v: v >= 1))),
    "irq-delay": (ANY, (Option("ms", float, 100.0, "milliseconds, 0 to 60000",
                               lambda v: 0 <= v <= 60000),
                        _AFTER, _COUNT)),
    "stall": (("console",), (Option("seconds", float, 1.0, "seconds, more than 0 and at "
                                    "most 600", lambda v: 0 < v <= 600),)),
    "drop": (("net",), _PICK + (_AFTER, _COUNT)),
    "corrupt": (("net",), _PICK + (_AFTER, _COUNT)),
    "delay": (("net",), _PICK[:3] + (Option("ms", float, 100.0, "milliseconds, 0 to 60000",
                                            lambda v: 0 <= v <= 60000), _AFTER, _COUNT)),
}


class Fault:
    """One armed fault: its name, options, and how often it matched and fired."""

    def __init__(self, name, device_name, options):
        if name not in FAULTS:
            raise AvatarError(f"unknown fault {name!r}: one of {', '.join(FAULTS)}")
        devices, known = FAULTS[name]
        if devices is not ANY and device_name not in devices:
            raise AvatarError(f"fault {name} applies to {' or '.join(devices)} devices, "
                              f"not {device_name}")
        names = {o.name for o in known}
        unknown = sorted(set(k for k, v in options.items() if v is not None) - names)
        if unknown:
            raise AvatarError(f"fault {name}: unknown option {unknown[0]} (it takes: "
                              f"{', '.join(sorted(names))})")
        self.name = name
        self.options = {o.name: o.read(name, options.get(o.name)) for o in known}
        if self.options.get("probability") is not None and self.options.get("every"):
            raise AvatarError(f"fault {name}: give probability or every, not both")
        self.rng = random.Random(self.options.get("seed", 0))
        self.seen = self.fired = 0

    def take(self):
        """One matching event: True when the fault fires on it."""
        self.seen += 1
        opts = self.options
        if self.seen <= opts["after"] or (opts["count"] is not None
                                          and self.fired >= opts["count"]):
            return False
        nth = self.seen - opts["after"]
        if opts.get("every") and nth % opts["every"]:
            return False
        if opts.get("probability") is not None and self.rng.random() >= opts["probability"]:
            return False
        self.fired += 1
        return True

    @property
    def spent(self):
        return self.options.get("count") is not None and self.fired >= self.options["count"]

    def describe(self):
        options = {k: (f"{v[0]}-{v[1]}" if k == "sectors" and v else v)
                   for k, v in self.options.items() if v is not None}
        return {"fault": self.name, "options": options, "seen": self.seen, "fired": self.fired}


class FaultPlan:
    """The faults armed on one device; ``loop`` (the device's guarded ``DeviceLoop``)
    runs delayed interrupts, the end of a stall."""

    def __init__(self, loop):
        self.loop = loop
        self.faults = []
        self.stalled_until = 0.0
        self._resume = {}               # outputs held by a stall (ordered, each once)

    def add(self, fault):
        self.faults.append(fault)
        if fault.name == "stall":
            self.stalled_until = time.monotonic() + fault.options["seconds"]
            fault.fired = 1

    def _first(self, names, accept=lambda fault: True):
        for fault in self.faults:
            if fault.name in names and not fault.spent and accept(fault) and fault.take():
                return fault
        return None

    # -- the hooks ---------------------------------------------------------------------------

    def block_request(self, write, sector, length):
        """``None``, or the ``ioerr``/``torn`` fault this request meets."""
        last = sector + max(length - 1, 0) // 512

        def matches(fault):
            opts = fault.options
            if fault.name == "torn" and not write:
                return False
            if fault.name == "ioerr" and opts["op"] != "any" and (opts["op"] == "write") != write:
                return False
            span = opts["sectors"]
            return span is None or (sector <= span[1] and last >= span[0])
        return self._first(("ioerr", "torn"), matches)

    def interrupt(self, context, bits, deliver):
        """True when this interrupt was taken: dropped, or ``deliver(bits)`` later unless
        ``context`` is no longer active then (reset meanwhile: nothing to interrupt for)."""
        fault = self._first(("irq-drop", "irq-delay"))
        if fault is None:
            return False
        if fault.name == "irq-delay":
            self.loop.call_later(fault.options["ms"] / 1000,
                                 lambda: context.active and deliver(bits))
        return True

    def output_stalled(self, resume):
        """True while a stall holds the guest's output; ``resume()`` (one per console port)
        is called when it ends."""
        left = self.stalled_until - time.monotonic()
        if left <= 0:
            return False
        if not self._resume:
            self.loop.call_later(left, self.end_stall)
        self._resume[resume] = None
        return True

    def end_stall(self):
        """Resume every output the stall held (at its end, or when cleared)."""
        callbacks, self._resume = list(self._resume), {}
        for callback in callbacks:
            callback()

    def frame(self, direction):
        """``None`` or the net fault this frame meets (``drop``, ``corrupt``, ``delay``)."""
        return self._first(("drop", "corrupt", "delay"), lambda f: f.options.get(
            "direction", "tx") in (direction, "both"))

    def describe(self):
        return [fault.describe() for fault in self.faults]


class FaultInjector:
    """Every device's plan in one daemon: ``inject``, ``clear``, ``describe``."""

    def __init__(self, subsystem, loop):
        self.subsystem, self.loop = subsystem, loop
        self.plans = {}             # (vm, slot) -> FaultPlan

    def inject(self, vm_id, slot, fault, **options):
        device = self.subsystem.device(vm_id, slot)
        armed = Fault(fault, device.name, options)
        span, capacity = armed.options.get("sectors"), getattr(device, "capacity", None)
        if span is not None and capacity is not None and span[1] >= capacity:
            raise AvatarError(f"fault {fault}: sectors {span[0]}-{span[1]} lie past the end of "
                              f"vm{vm_id} {device.name}{slot}: its image has {capacity} sectors "
                              f"(0-{capacity - 1})")
        if device.context is None:
            raise AvatarError(f"VM {vm_id} slot {slot} has no transport yet")
        plan = self.plans.get((vm_id, slot))
        if plan is None:
            plan = self.plans[vm_id, slot] = FaultPlan(device.loop or self.loop)
            device.context.faults = plan
        plan.add(armed)
        return armed.describe()

    def clear(self, vm_id=None, slot=None):
        """Disarm the faults of one device, one VM's, or all; the number of faults cleared.
        A stalled console is resumed now."""
        cleared = 0
        for key in [k for k in self.plans if vm_id is None or (k[0] == vm_id and (
                slot is None or k[1] == slot))]:
            plan = self.plans.pop(key)
            cleared += len(plan.faults)
            self.subsystem.device(*key).context.faults = None
            if plan._resume:
                plan.loop.call_later(0, plan.end_stall)
        return cleared

    def describe(self):
        return [{"vm": vm, "slot": slot, "name": self.subsystem.device(vm, slot).name,
                 "faults": plan.describe()} for (vm, slot), plan in sorted(self.plans.items())]
