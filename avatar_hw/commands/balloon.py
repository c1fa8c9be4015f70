"""``avatar-hw balloon VM [SIZE]``: how much memory a VM keeps (its balloon takes the rest).

SIZE is the guest memory the VM keeps, as QEMU's ``balloon`` monitor command takes it
(``384M``, ``1G``; its whole RAM or more: an empty balloon); without it, the balloon's
state. Through the daemon's control socket (avatar_hw.control's ``balloon`` request).
"""

import json

from . import values_may_be_negative
from ..control import add_control_option, request
from ..sizes import parse_size
from ..errors import AvatarError
from .query import format_balloon


def run(args):
    arguments = {"vm": args.vm}
    if args.size is not None:
        try:
            arguments["size"] = parse_size(args.size)
        except ValueError as err:
            raise AvatarError(f"balloon: {err}") from None
    result = request("balloon", args.control, **arguments)
    print(json.dumps(result, indent=2) if args.json else f"vm{args.vm} {format_balloon(result)}")


def add_parser(subparsers, parents=()):
    parser = subparsers.add_parser(
        "balloon", parents=parents, help="set how much memory a VM keeps (virtio-balloon)",
        description="Set the guest memory VM keeps (its virtio-balloon takes the rest of its "
                    "RAM; the whole RAM or more: an empty balloon), as QEMU's balloon monitor "
                    "command does; without SIZE, show the balloon: target, what the guest "
                    "holds, its memory statistics.")
    values_may_be_negative(parser)
    parser.add_argument("vm", type=int, help="VM number")
    parser.add_argument("size", nargs="?",
                        help="guest memory the VM keeps: bytes, or with K, M, G (e.g. 384M); "
                             "default: show the balloon")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_control_option(parser)
    parser.set_defaults(func=run)
