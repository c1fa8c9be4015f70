"""``avatar-hw inject``: arm a fault on a running daemon's device, pause it, or clear faults.

The requests are avatar_hw.control's ``inject``, ``pause``, ``clear`` and ``faults``;
the faults and their options are avatar_hw.faults's (docs/testing.md, "Fault injection").
"""

import json

from . import values_may_be_negative
from ..control import add_control_option, request
from ..errors import AvatarError
from ..faults import FAULTS

# command-line option -> the fault option it sets
OPTIONS = (("--sectors", "FIRST-LAST: inclusive sector range (ioerr, torn)"),
           ("--op", "read, write or any (ioerr)"),
           ("--keep", "bytes of a torn write that reach the image (torn)"),
           ("--after", "let this many matching events pass first"),
           ("--count", "fire this many times (default: until cleared; irq-drop: 1)"),
           ("--ms", "milliseconds (irq-delay, delay)"),
           ("--seconds", "seconds (stall)"),
           ("--probability", "fire on a frame with this probability (drop, corrupt, delay)"),
           ("--every", "fire on every Nth frame (drop, corrupt, delay)"),
           ("--seed", "the RNG seed of --probability (default 0)"),
           ("--direction", "tx, rx or both (drop, corrupt; default both)"))


USAGE = ("inject: give VM DEVICE FAULT (and that fault's options), or one of --clear "
         "[VM [DEVICE]], --pause SECONDS, --list")


def _check_usage(args):
    """One thing asked: a fault to arm (with its options), --clear, --pause or --list."""
    asked = [given for given in (args.fault is not None, args.clear, args.pause is not None,
                                 args.list) if given]
    options = any(getattr(args, name[2:]) is not None for name, _ in OPTIONS)
    positional = args.vm is not None and not args.clear and args.fault is None
    if len(asked) != 1 or options and args.fault is None or positional:
        raise AvatarError(USAGE)


def run(args):
    _check_usage(args)
    if args.clear:
        result = request("clear", args.control, vm=args.vm, device=args.device)
        print(f"cleared {result['cleared']} fault(s)"
              + (", ended the pause" if result.get("pause_ended") else ""))
        return
    if args.pause is not None:
        result = request("pause", args.control, seconds=args.pause)
        print(f"serving no trap for {result['paused']} s")
        return
    if args.list:
        result = request("faults", args.control)
        print(json.dumps(result, indent=2) if args.json else "\n".join(
            f"vm{d['vm']} {d['name']}{d['slot']}: {f['fault']} {f['options']} "
            f"(matched {f['seen']}, fired {f['fired']})"
            for d in result for f in d["faults"]) or "no faults armed")
        return
    options = {name[2:]: getattr(args, name[2:]) for name, _ in OPTIONS
               if getattr(args, name[2:]) is not None}
    result = request("inject", args.control, vm=args.vm, device=args.device, fault=args.fault,
                     options=options)
    print(json.dumps(result) if args.json else
          f"armed {result['fault']} on vm{args.vm} {args.device}: {result['options']}")


def add_parser(subparsers, parents=()):
    parser = subparsers.add_parser(
        "inject", parents=parents, help="inject a device fault into the running daemon",
        description="Arm a fault on one device of the running daemon (faults: "
                    f"{', '.join(FAULTS)}), pause its trap service, list or clear faults. "
                    "See docs/testing.md, 'Fault injection', for what the guest sees.")
    values_may_be_negative(parser)
    parser.add_argument("vm", nargs="?", type=int, help="VM number")
    parser.add_argument("device", nargs="?", help="slot number or name (block, console0, ...)")
    parser.add_argument("fault", nargs="?", choices=sorted(FAULTS), help="the fault")
    for name, text in OPTIONS:
        parser.add_argument(name, help=text)
    parser.add_argument("--clear", action="store_true",
                        help="disarm every fault (of VM DEVICE when given)")
    parser.add_argument("--pause", type=float, metavar="SECONDS",
                        help="serve no trap for SECONDS")
    parser.add_argument("--list", action="store_true", help="list the armed faults")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_control_option(parser)
    parser.set_defaults(func=run)
