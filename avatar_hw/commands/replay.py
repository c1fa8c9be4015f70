"""``avatar-hw replay FILE --config VMS.toml``: replay a recording (``serve --record``) on the
device model with no board and no QEMU (avatar_hw.replay); exit 0 if every register answer,
guest-memory write and interrupt is the same, else 1 with the first difference in one line;
a file that is not a whole recording (cut, damaged, another version) is one error line naming
it (exit 2)."""

from pathlib import Path

from ..config import load_config
from ..errors import AvatarError
from ..layout import Layout
from ..replay import ReplayFormatError, build_from_config, replay


def run(args):
    def build(meta):
        layout = Layout(**meta["layout"])
        config = load_config(args.config, max_vms=layout.max_vms,
                             devices_per_vm=layout.devices_per_vm)
        return build_from_config(config)(meta)
    try:
        traps, difference = replay(args.file, build)
    except ReplayFormatError as err:
        raise AvatarError(f"replay: {err}") from None
    if difference is not None:
        print(f"{args.file}: DIFFERENT at {difference}")
        return 1
    print(f"{args.file}: {traps} traps replayed, every answer, guest-memory write and "
          f"interrupt the same")
    return 0


def add_parser(subparsers, parents=()):
    parser = subparsers.add_parser(
        "replay", parents=parents, help="replay a recording made with serve --record",
        description="Rebuild the VMs' devices from the config (no board, no QEMU), feed them "
                    "the recorded guest memory and traps, and check every register answer, "
                    "guest-memory write and interrupt against the recording. The config's "
                    "backends must give what they gave when recording started (a copy of "
                    "each block image as it was, a fixed rng source).")
    parser.add_argument("file", type=Path, help="the recording (serve --record FILE)")
    parser.add_argument("--config", required=True, type=Path,
                        help="VMs config the recording was served with (VMS.toml)")
    parser.set_defaults(func=run)
