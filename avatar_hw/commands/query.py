"""``avatar-hw list | info | debug``: ask the running daemon through its control socket.

The requests and answers are avatar_hw.control's; this module formats them
(``--json``: as they come).
"""

import json

from .. import abi
from ..control import add_control_option, request


# -- formatting ----------------------------------------------------------------------

def _bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _device_line(d):
    return f"vm{d['vm']} slot{d['slot']} {d['name']:<8} {d['base']:>10} IRQ {d['irq']}"


def format_list(devices):
    return "\n".join(_device_line(d) for d in devices) or "no devices"


def format_queue(q):
    return (f"q{q['index']}: size {q['size']}/{q['max_size']}{' ready' if q['ready'] else ''}"
            f"{' BROKEN' if q['broken'] else ''} desc {q['desc']} driver {q['driver']} "
            f"device {q['device']} last_avail {q['last_avail_idx']} used {q['used_idx']} "
            f"in flight {q['in_flight']} bad chains {q['bad_chains']}")


# keys every device's entry has; the rest are the device's own (block's image, 9p's tag, ...)
COMMON_KEYS = {"vm", "slot", "name", "device_id", "base", "irq", "legacy", "status", "requests",
               "bytes_from_guest", "bytes_to_guest", "errors", "interrupts", "guest_errors",
               "idle_traps", "logged_errors", "log_lines_suppressed", "offered_features",
               "driver_features", "negotiated_features", "interrupt_status", "config_generation",
               "queues"}


def format_device(d, indent="  "):
    lines = [f"{_device_line(d)}  status {d['status']}",
             f"{indent}features offered {d['offered_features']} negotiated "
             f"{d['negotiated_features']}; interrupts {d['interrupts']} (status "
             f"{d['interrupt_status']}); register accesses: waited {d.get('traps_waited', 0)}, "
             f"posted {d.get('posted_writes', 0)}, shadow {d.get('shadow_reads', 0)}, "
             f"acks at the stub {d.get('stub_acks', 0)}; "
             f"guest->host {_bytes(d['bytes_from_guest'])}, "
             f"host->guest {_bytes(d['bytes_to_guest'])}; requests {d['requests']}; "
             f"errors {d['errors']}; guest errors {d.get('guest_errors', 0)}, idle traps "
             f"{d.get('idle_traps', 0)}, logged errors "
             f"{d.get('logged_errors', 0)} (log lines suppressed "
             f"{d.get('log_lines_suppressed', 0)})"]
    if "balloon" in d:
        lines.append(f"{indent}{format_balloon(d['balloon'])}")
    own = [f"{key} {value}" for key, value in d.items() if key not in COMMON_KEYS
           and isinstance(value, (str, int, float, bool, type(None)))]
    if own:
        lines.append(f"{indent}{d['name']}: " + "; ".join(own))
    lines += [f"{indent}{format_queue(q)}" for q in d.get("queues", ())]
    return "\n".join(lines)


def format_balloon(b):
    """One line of a balloon's state (``avatar-hw balloon``, ``info``)."""
    held = "unknown" if b["balloon"] is None else _bytes(b["balloon"])
    line = (f"balloon: keep {_bytes(b['target'])} of {_bytes(b['ram'])} (balloon target "
            f"{_bytes(b['balloon_target'])}, the guest holds {held}); release {b['release']}")
    stats = b["stats"]
    if stats:
        memory = ", ".join(f"{name.replace('_memory', '')} {_bytes(stats[name])}"
                           for name in ("free_memory", "available_memory", "total_memory")
                           if name in stats)
        line += f"; guest memory {memory or 'not reported'} ({b['stats_age']:.0f} s ago)"
    return line


def format_info(info):
    t = info["trap"]
    window = ""
    if "poll_window_ns" in t:
        spare = t["poll_spare_cores"]
        window = (f" (poll window {t['poll_window_ns'] / 1000:g} us, "
                  + ("spare CPU not measured yet" if spare is None else
                     f"{spare:g} core spare") + ")")
    lines = [f"avatar-hw PID {info['pid']} on board {info['board']}, up {info['uptime']:.0f} s, "
             f"wait {info['mode']}{window}; trap ABI {t['abi']}, {t['slots']} slot(s), features "
             f"0x{t['model_features']:x}; traps {t['served']} (unhandled {t['unhandled']}, "
             f"malformed {t['malformed']}, posted writes {t['posted_writes']})"
             + (f"; interrupts: stub rung {t['stub_rings']}, not rung {t['stub_rings_skipped']} "
                "(the stub polled for them, had taken them, or had yet to take the last ring)"
                if "stub_rings" in t else "")]
    for vm in info["vms"]:
        paced = ""
        if vm.get("paced_periods"):
            paced = (f", paced {vm['paced_periods']} period(s) for its {vm['paced_for']}"
                     + (" (now)" if vm["paced"] else ""))
        polls = ""
        if t["model_features"] & abi.F_HALT_POLL:
            polls = (f"; guest WFIs: {vm['wfi_caught']} caught by the stub's poll, "
                     f"{vm['wfi_ran_out']} polls ran out, {vm['wfi_slept']} not polled")
        lines.append(f"vm{vm['vm']}: RAM {vm['ram']['base']} + {_bytes(vm['ram']['size'])}, "
                     f"window {vm['window'][0]}-{vm['window'][1]}; traps served "
                     f"{vm['traps_served']} in {vm['service_ms']:.0f} ms, put off "
                     f"{vm['traps_deferred']} (fair order), idle {vm['idle_traps']} (at most "
                     f"{vm['idle_traps_peak']} in a period){paced}{polls}")
        lines += ["  " + format_device(d, "    ").replace("\n", "\n  ") for d in vm["devices"]]
    return "\n".join(lines)


def _print(result, args, formatter):
    print(json.dumps(result, indent=2) if args.json else formatter(result))


def _list(args):
    _print(request("list", args.control), args, format_list)


def _info(args):
    _print(request("info", args.control), args, format_info)


def _debug(args):
    _print(request("debug", args.control, vm=args.vm, device=args.device), args, format_device)


def add_parser(subparsers, parents=()):
    for name, func, text in (
            ("list", _list, "list the running daemon's devices"),
            ("info", _info, "the running daemon's VMs, devices, queues and counters"),
            ("debug", _debug, "everything about one device of the running daemon")):
        parser = subparsers.add_parser(name, parents=parents, help=text,
                                       description=text + ".")
        if name == "debug":
            parser.add_argument("vm", type=int, help="VM number")
            parser.add_argument("device", help="slot number or name (console, console0, ...)")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        add_control_option(parser)
        parser.set_defaults(func=func)
