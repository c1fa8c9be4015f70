"""``avatar-hw layout``: every device slot's window and INTIDs, as a board file defines them,
and with ``--config`` which device a VMs config puts in each."""

import json

from ..board import load_board
from ..config import config_path, load_config
from ..errors import AvatarError
from ..layout import address
from ..shipped import DEFAULT_BOARD, board_path


def device_map(board, vms=None, config=None):
    """Every device slot of the first ``vms`` VMs, as the JSON of ``avatar-hw layout --json``.

    ``guest_intid``: the INTID the guest's device tree names; ``board_intid``:
    the SPI the daemon raises for it (equal with ``interrupts.kind = "stub"``,
    where the stub injects the guest INTID itself); ``device``: the kind ``config`` (a
    ``Config``) puts in the slot, in the order the daemon fills them, or None.
    """
    lay = board.layout
    vms = lay.max_vms if vms is None else vms
    if not 1 <= vms <= lay.max_vms:
        raise AvatarError(f"--vms {vms}: board {board.name} ({board.path}) has 1 to "
                          f"{lay.max_vms} VMs")
    result = []
    for vm in range(vms):
        first, last = lay.vm_window(vm)
        kinds = [d.kind for d in config.vms[vm].devices] if config and vm in config.vms else []
        devices = [{"slot": k, "base": address(lay.window(vm, k)),
                    "end": address(lay.window(vm, k) + lay.device_size - 1),
                    "guest_intid": lay.intid(vm, k),
                    "board_intid": board.board_intid(lay.intid(vm, k)),
                    "device": kinds[k] if k < len(kinds) else None}
                   for k in range(lay.devices_per_vm)]
        result.append({"vm": vm, "window": [address(first), address(last)],
                       "guest_intids": [devices[0]["guest_intid"], devices[-1]["guest_intid"]],
                       "devices": devices})
    return {"board": board.name, "interrupts": board.interrupts,
            "doorbell_intid": board.doorbell_intid, "vms": result}


def format_device_map(table):
    lines = [f"board {table['board']}: {len(table['vms'])} VM(s), "
             f"{len(table['vms'][0]['devices'])} devices per VM"]
    if table["doorbell_intid"] is not None:
        lines[0] += f", trap doorbell INTID {table['doorbell_intid']}"
    for vm in table["vms"]:
        lines.append(f"VM{vm['vm']}  {vm['window'][0]}-{vm['window'][1]}  "
                     f"guest INTIDs {vm['guest_intids'][0]}-{vm['guest_intids'][1]}")
        lines += [f"  device {d['slot']}  {d['base']}-{d['end']}  guest INTID {d['guest_intid']}  "
                  f"board INTID {d['board_intid']}" + (f"  {d['device']}" if d["device"] else "")
                  for d in vm["devices"]]
    return "\n".join(lines)


def run(args):
    board = load_board(board_path(args.board))
    config = args.config and load_config(config_path(args.config), max_vms=board.layout.max_vms,
                                         devices_per_vm=board.layout.devices_per_vm)
    table = device_map(board, args.vms, config)
    print(json.dumps(table, indent=2) if args.json else format_device_map(table))


def add_parser(subparsers, parents=()):
    parser = subparsers.add_parser(
        "layout", parents=parents, help="print every device slot's window and INTIDs",
        description="Print each VM's virtio-mmio window and every device slot's address "
                    "range, the INTID its guest sees and the board SPI the daemon raises for "
                    "it, as the board file defines them.")
    parser.add_argument("--board", default=DEFAULT_BOARD,
                        help="board file, or the name of a shipped board "
                             f"(default: {DEFAULT_BOARD})")
    parser.add_argument("--vms", type=int, help="how many VMs to show (default: all)")
    parser.add_argument("--config", metavar="VMS.toml",
                        help="a VMs config (or vms-example): name the device in each slot")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)
