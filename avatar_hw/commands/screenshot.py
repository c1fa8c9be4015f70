"""``avatar-hw screenshot VM OUT.png``: the running daemon's GPU scanout of a VM, as a PNG.

The daemon encodes it (avatar_hw.control's ``screenshot`` request); this side
writes the file.
"""

import base64

from ..control import add_control_option, request
from ..errors import AvatarError


def _screenshot(args):
    shot = request("screenshot", args.control, vm=args.vm, device=args.device)
    try:
        with open(args.out, "wb") as f:
            f.write(base64.b64decode(shot["png"]))
    except OSError as err:
        raise AvatarError(f"{args.out}: {err.strerror}; give a writable path") from None
    print(f"{args.out}: {shot['width']}x{shot['height']}")


def add_parser(subparsers, parents=()):
    text = "write a VM's screen (its gpu's scanout) to a PNG file"
    parser = subparsers.add_parser("screenshot", parents=parents, help=text,
                                   description=text + ".")
    parser.add_argument("vm", type=int, help="VM number")
    parser.add_argument("out", help="the PNG file to write")
    parser.add_argument("--device", default="gpu",
                        help="the gpu's slot number or name (default: the VM's first gpu)")
    add_control_option(parser)
    parser.set_defaults(func=_screenshot)
