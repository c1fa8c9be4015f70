"""Board mode on the emulated board: boot to the guest's shell and the trap round trip.

Board mode (docs/emulated-board.md, "Board mode") runs the board's own Linux on
CPU0 with avatar-hw (arm64 Python, under TCG) serving the guest on CPU1; host
mode runs the daemon on the host beside QEMU. Both boot the emulated board's
initramfs plus ``bin/avbench`` (bench/board.py's ``build_initrd``), with
``iomem=relaxed`` so that ``avbench mmio`` can map the guest's own virtio window
from /dev/mem and time single 32-bit accesses to the console's registers:

- a read of MagicValue: in both modes the stub answers it from the register shadow
  page (no daemon involved);
- a write of 0 to QueueSel: a round trip through the daemon in both modes (a
  selector write is never posted).

Board mode's boot is timed in steps on the host's clock from QEMU's start: the
board Linux's shell, its daemon serving (its log says so), the guest's shell;
and in the board Linux, ``python3 -c pass`` and ``avatar-hw list --json``.
One run per mode (a board-mode boot takes minutes): ``python -m bench --only board_linux``.
"""

import re
import tempfile
import time

from avatar_hw.emulated import board_linux
from avatar_hw.emulated import memory_map as mm
from avatar_hw.emulated.devicetree import DEFAULT_BOOTARGS
from avatar_hw.emulated.session import EmulatedBoard
from avatar_hw.errors import AvatarError
from avatar_hw.virtio import constants as vc

from .board import build_initrd
from .common import table

BOOTARGS = DEFAULT_BOOTARGS + " iomem=relaxed"
TIMEOUT = 300
COUNTS = (2000, 200)       # accesses per register: full run, --quick


def _time(run, command, timeout=TIMEOUT):
    """Seconds ``command`` took in a shell (host clock; the console's own latency included)."""
    start = time.perf_counter()
    output, status = run(command, timeout=timeout)
    if status != 0:
        raise AvatarError(f"{command!r} exited {status}: {output[-300:]}")
    return time.perf_counter() - start


def _mmio(shell, address, count, value=None):
    """``avbench mmio`` in the guest: {per-access figures in µs, the value read or written}."""
    command = f"avbench mmio {address:#x} {count}" + ("" if value is None else f" {value}")
    output, status = shell.run(command, timeout=TIMEOUT)
    match = re.search(r"avbench mmio \w+ count=(\d+) ns=(\d+) p50_ns=(\d+) p99_ns=(\d+) "
                      r"max_ns=(\d+) value=(0x[0-9a-f]+)", output)
    if status != 0 or match is None:
        raise AvatarError(f"{command}: exited {status}: {output[-300:]}")
    count, total, p50, p99, most = (int(g) for g in match.groups()[:5])
    return {"mean_us": total / count / 1e3, "p50_us": p50 / 1e3, "p99_us": p99 / 1e3,
            "max_us": most / 1e3, "count": count, "value": int(match.group(6), 16)}


def _trap_spis(board_shell):
    """How often the trap SPI (the doorbell) has interrupted the board Linux."""
    output, _ = board_shell.run("grep avatar-trap /proc/interrupts")
    return int(output.split()[1])


def _accesses(shell, window, count, board_shell=None):
    """MagicValue reads and QueueSel writes; in board mode also the doorbell rings each."""
    out = {}
    for name, offset, value in (("read MagicValue", vc.REG_MAGIC_VALUE, None),
                                ("write QueueSel", vc.REG_QUEUE_SEL, 0)):
        rings = _trap_spis(board_shell) if board_shell else None
        out[name] = _mmio(shell, window + offset, count, value)
        if board_shell:
            out[name]["doorbells_per_access"] = (_trap_spis(board_shell) - rings) / count
    if out["read MagicValue"]["value"] != vc.MMIO_MAGIC:
        raise AvatarError(f"MagicValue read {out['read MagicValue']['value']:#x}: the daemon "
                          f"did not answer (no model attached?)")
    return out


def measure_board(initrd, count):
    start = time.perf_counter()
    with EmulatedBoard(board_linux=True, initrd=initrd, bootargs=BOOTARGS) as board:
        steps = {"qemu_started_s": time.perf_counter() - start}
        shell = board.board_shell(TIMEOUT)
        steps["board_shell_s"] = time.perf_counter() - start
        board_linux.wait_serving(shell, TIMEOUT)
        steps["daemon_serving_s"] = time.perf_counter() - start
        guest = board.shell(TIMEOUT)
        steps["guest_shell_s"] = time.perf_counter() - start
        steps["board_python3_pass_s"] = _time(shell.run, "python3 -c pass")
        steps["board_list_json_s"] = _time(shell.run, "avatar-hw list --json >/dev/null")
        window = mm.LAYOUT.window(board_linux.GUEST_VM, 0)
        return {"boot": steps, "traps": _accesses(guest, window, count, shell)}


def measure_host(initrd, count):
    start = time.perf_counter()
    with EmulatedBoard(initrd=initrd, bootargs=BOOTARGS) as board:
        boot = {"qemu_started_s": time.perf_counter() - start}
        guest = board.shell(TIMEOUT)
        boot["guest_shell_s"] = time.perf_counter() - start
        return {"boot": boot, "traps": _accesses(guest, mm.LAYOUT.window(0, 0), count)}


def run(quick=False):
    count = COUNTS[1 if quick else 0]
    with tempfile.TemporaryDirectory(prefix="avatar-bench-") as workdir:
        initrd = build_initrd(workdir)
        out = {"host": measure_host(initrd, count), "board": measure_board(initrd, count)}
    report(out)
    return out


def report(out):
    board, host = out["board"]["boot"], out["host"]["boot"]

    def since_qemu(boot, step):
        return f"{boot[step] - boot['qemu_started_s']:.1f}" if step in boot else "-"
    table("Board mode: boot (s, host clock)", ["step", "board mode", "host mode"],
          [["the launcher, until QEMU runs", f"{board['qemu_started_s']:.1f}",
            f"{host['qemu_started_s']:.1f}"],
           *([what + " (from QEMU running)", since_qemu(board, step), since_qemu(host, step)]
             for what, step in (("the board Linux's shell", "board_shell_s"),
                                ("its daemon serving the guest", "daemon_serving_s"),
                                ("the guest's shell", "guest_shell_s"))),
           ["board Linux: python3 -c pass", f"{board['board_python3_pass_s']:.1f}", "-"],
           ["board Linux: avatar-hw list --json", f"{board['board_list_json_s']:.1f}", "-"]])
    rows = []
    for access in out["board"]["traps"]:
        b, h = out["board"]["traps"][access], out["host"]["traps"][access]
        rows.append([access, f"{b['p50_us']:.0f}", f"{b['p99_us']:.0f}", f"{b['mean_us']:.0f}",
                     f"{b['doorbells_per_access']:.2f}", f"{h['p50_us']:.0f}",
                     f"{h['p99_us']:.0f}", f"{h['mean_us']:.0f}",
                     f"{b['mean_us'] / h['mean_us']:.0f}x"])
    table("Board mode: one 32-bit access to the guest's console registers (µs, guest clock)",
          ["access", "board p50", "p99", "mean", "doorbells", "host p50", "p99", "mean",
           "board/host"], rows)
