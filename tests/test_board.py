"""Board files: the shipped boards, the layout command, every bad input, region specs."""

import json
import os
import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from avatar_hw import cli
from avatar_hw.board import load_board
from avatar_hw.shipped import BOARD_DIRS, board_path, shipped_boards
from avatar_hw.errors import AvatarError, ConfigError, DeviceNotFound
from avatar_hw.hw.gic import GicError, GicV2Distributor
from avatar_hw.layout import Layout
from avatar_hw.testing.fake_uio import make_tree
from test_config import ODD, toml_value

BOARDS = Path(__file__).resolve().parent.parent / "boards"
RPI4 = (BOARDS / "rpi4.toml").read_text()
SEED = Layout(base=0x0A000000, vm_size=0x10000, device_size=0x1000, irq_base=48,
              irqs_per_vm=8, max_vms=8)


@pytest.mark.parametrize("name, gicd, gicc, lines, max_vms, board_intids", [
    ("rpi4", 0xFF841000, 0xFF842000, 224, 4, [*range(191, 208), *range(209, 224)]),
    ("rpi4-high-peri", 0x4C0041000, 0x4C0042000, 224, 4, [*range(191, 208), *range(209, 224)]),
    ("qemu-virt", 0x08000000, 0x08010000, 288, 8, list(range(208, 272)))])
def test_shipped_boards_load(name, gicd, gicc, lines, max_vms, board_intids):
    board = load_board(board_path(name))
    assert board.name == name and board.layout == replace(SEED, max_vms=max_vms)
    assert (board.interrupts, board.gic.version, board.gic.distributor, board.gic.cpu_interface,
            board.gic.lines) == ("gic", "v2", gicd, gicc, lines)
    assert (board.gic.region.uio, board.trap.uio, board.ram.uio) == (
        "avatar-gicd", "avatar-trap", "avatar-vm{vm}-ram")
    assert board.ram.name_for(1) == "avatar-vm1-ram"
    assert board.ram_guest_base == 0x40000000
    assert list(board.board_intids) == board_intids
    assert [board.board_intid(g) for g in (48, 48 + 8 * max_vms - 1)] == [board_intids[0],
                                                                          board_intids[-1]]
    reserved = {i for entry in board.reserved_intids for i in entry}
    assert not reserved & set(board_intids) and board.doorbell_intid not in board_intids


# GIC_SPI numbers the Raspberry Pi kernel's bcm2711.dtsi, bcm2711-rpi.dtsi, bcm2711-rpi-ds.dtsi
# (and rpi-6.12's hevc_dec, xhci nodes) give to devices: the Pi 4 files reserve every one.
BCM2711_GIC_SPIS = [*range(16, 20), 33, 34, 40, *range(64, 68), *range(73, 76), *range(80, 94),
                    96, 97, 98, 100, 101, 102, 103, 106, *range(108, 111), 112,
                    *range(113, 119), 120, 121, 123, 126, *range(143, 149), 157, 158, 176]
# The issue's own list of the GIC_SPI numbers in those files (issue 11, defect 2).
ISSUE_GIC_SPIS = [*range(16, 20), 33, 34, 40, *range(64, 68), *range(73, 76), *range(80, 89), 93,
                  96, 97, 100, 101, 106, *range(108, 111), *range(113, 119), 120, 121, 123, 126,
                  143, 148, 157, 158]
# BCM2711 ARM Peripherals, GIC-400 interrupt IDs: every INTID a source is wired to. The GIC-400
# has NUM_SPIS=192 (INTIDs 0..223); ARM_LOCAL's PMU; ARMC 64-79; the VideoCore's 64 IRQs 96-159;
# ETH_PCIe 160-216, of whose 57 lines 9 (AVS), 15-20 (PCIe INTA-D, PCIe, MSI: the DTs give all
# six to the PCIe node), 29-30 (GENET) and 48 (XHCI) have a device.
BCM2711_SOURCES = {*range(48, 52), *range(64, 80), *range(96, 160),
                   *(160 + n for n in (9, 15, 16, 17, 18, 19, 20, 29, 30, 48))}
BCM2711_LINES = 224


@pytest.mark.parametrize("name", ["rpi4", "rpi4-high-peri"])
def test_pi4_boards_reserve_every_bcm2711_source(name):
    board = load_board(board_path(name))
    reserved = {i for entry in board.reserved_intids for i in entry}
    assert {spi + 32 for spi in BCM2711_GIC_SPIS} <= reserved
    assert {spi + 32 for spi in ISSUE_GIC_SPIS} <= reserved
    assert reserved == BCM2711_SOURCES
    assert board.gic.lines == BCM2711_LINES
    # Every board SPI and the doorbell exist on the GIC-400 and have no source wired to them.
    used = [*board.board_intids, board.doorbell_intid]
    assert all(32 <= i < BCM2711_LINES and i not in BCM2711_SOURCES for i in used)
    assert len(set(used)) == len(used) == 33


def test_pi4_doorbell_intid_is_the_overlays_trap_interrupt():
    overlay = (BOARDS.parent / "scripts" / "avatar-rpi4-overlay.dts").read_text()
    trap_node = overlay[overlay.index("avatar-trap {"):]
    trap_node = trap_node[:trap_node.index("};")]
    spi = int(re.search(r"interrupts = <0 (\d+) \d+>", trap_node).group(1))
    assert load_board(board_path("rpi4")).doorbell_intid == spi + 32


def test_board_names_resolve_to_the_shipped_files(tmp_path, monkeypatch, capsys):
    assert board_path("rpi4") == BOARD_DIRS[0] / "rpi4.toml" == BOARDS / "rpi4.toml"
    assert board_path("my/board") == Path("my/board")
    assert board_path("mine.toml") == Path("mine.toml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b5.txt").write_bytes((BOARDS / "rpi4.toml").read_bytes())
    (tmp_path / "qemu-virt").mkdir()
    assert board_path("b5.txt") == Path("b5.txt")        # a file given wins, as --config's
    assert board_path("qemu-virt") == BOARDS / "qemu-virt.toml"      # a directory does not
    assert run_cli(capsys, "layout", "--board", "b5.txt")[0] == 0
    shipped = shipped_boards()
    assert {"qemu-virt", "rpi4", "rpi4-high-peri"} <= set(shipped) and shipped == sorted(shipped)
    with pytest.raises(ConfigError) as err:
        board_path("rpi5")
    assert str(err.value) == ("rpi5: no board file or shipped board of that name; "
                              f"shipped boards: {', '.join(shipped)}")


# -- avatar-hw layout ---------------------------------------------------------------------

def expected_rpi4_two_vms():
    """The seed's map: VM v at 0x0a000000 + v * 0x10000, device k at + k * 0x1000, guest INTIDs
    48 + 8v + k; board INTIDs 191.. with 208 (the XHCI's) skipped."""
    board_intids = [*range(191, 208), *range(209, 224)]
    vms = []
    for vm, (first, last, intids) in enumerate([("0x0a000000", "0x0a00ffff", [48, 55]),
                                                ("0x0a010000", "0x0a01ffff", [56, 63])]):
        base = int(first, 16)
        vms.append({"vm": vm, "window": [first, last], "guest_intids": intids, "devices": [
            {"slot": k, "base": f"0x{base + k * 0x1000:08x}",
             "end": f"0x{base + k * 0x1000 + 0xfff:08x}", "guest_intid": intids[0] + k,
             "board_intid": board_intids[8 * vm + k], "device": None} for k in range(8)]})
    return {"board": "rpi4", "interrupts": "gic", "doorbell_intid": 185, "vms": vms}


def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_layout_json_for_rpi4_two_vms(capsys):
    status, out, err = run_cli(capsys, "layout", "--board", "boards/rpi4.toml", "--vms", "2",
                               "--json")
    assert (status, err) == (0, "")
    assert json.loads(out) == expected_rpi4_two_vms()
    assert json.loads(out)["vms"][1]["devices"][7] == {
        "slot": 7, "base": "0x0a017000", "end": "0x0a017fff", "guest_intid": 63,
        "board_intid": 206, "device": None}


def test_layout_text_for_rpi4_two_vms(capsys):
    status, out, _ = run_cli(capsys, "layout", "--board", str(BOARDS / "rpi4.toml"), "--vms", "2")
    lines = ["board rpi4: 2 VM(s), 8 devices per VM, trap doorbell INTID 185"]
    for vm in expected_rpi4_two_vms()["vms"]:
        lines.append(f"VM{vm['vm']}  {vm['window'][0]}-{vm['window'][1]}  "
                     f"guest INTIDs {vm['guest_intids'][0]}-{vm['guest_intids'][1]}")
        lines += [f"  device {d['slot']}  {d['base']}-{d['end']}  guest INTID {d['guest_intid']}"
                  f"  board INTID {d['board_intid']}" for d in vm["devices"]]
    assert status == 0 and out == "\n".join(lines) + "\n"
    assert "VM1  0x0a010000-0x0a01ffff  guest INTIDs 56-63\n" in out
    assert "  device 3  0x0a003000-0x0a003fff  guest INTID 51  board INTID 194\n" in out
    assert "  device 7  0x0a017000-0x0a017fff  guest INTID 63  board INTID 206\n" in out


def test_layout_with_a_config_names_the_device_in_each_slot(capsys, tmp_path):
    """In the order the daemon fills the slots (config.py's), whatever order the file has."""
    status, out, _ = run_cli(capsys, "layout", "--board", "emulated", "--config", "vms-example",
                             "--json")
    vms = json.loads(out)["vms"]
    assert status == 0 and [d["device"] for d in vms[0]["devices"]] == [
        "console", "block", "rng", "net", "balloon", "9p", "vsock", "gpu"]
    assert [d["device"] for d in vms[1]["devices"]] == ["console", "block", "net", *[None] * 5]
    assert all(d["device"] is None for vm in vms[2:] for d in vm["devices"])
    config = tmp_path / "vms.toml"
    config.write_text('[vm.1]\nrng = {}\nconsole = { endpoints = "file:log" }\n')
    status, out, _ = run_cli(capsys, "layout", "--board", "emulated", "--vms", "2",
                             "--config", str(config))
    assert status == 0 and "  device 0  0x0a010000-0x0a010fff  guest INTID 56  board INTID 56  " \
        "console\n  device 1  0x0a011000-0x0a011fff  guest INTID 57  board INTID 57  rng\n" in out
    status, out, err = run_cli(capsys, "layout", "--config", str(tmp_path / "nosuch.toml"))
    assert (status, out) == (2, "") and err == (f"avatar-hw: {tmp_path / 'nosuch.toml'}: no such "
                                                "VMs config file\n")


def test_layout_of_a_stub_board_raises_the_guest_intids(capsys):
    status, out, _ = run_cli(capsys, "layout", "--board", "emulated", "--vms", "1", "--json")
    devices = json.loads(out)["vms"][0]["devices"]
    assert status == 0 and [(d["guest_intid"], d["board_intid"]) for d in devices] == [
        (48 + k, 48 + k) for k in range(8)]


def test_layout_defaults_to_rpi4_with_all_vms(capsys, monkeypatch):
    monkeypatch.chdir("/")                      # found without the checkout as working dir
    status, out, _ = run_cli(capsys, "layout", "--json")
    table = json.loads(out)
    assert status == 0 and table["board"] == "rpi4" and len(table["vms"]) == 4
    assert table["vms"][3]["guest_intids"] == [72, 79]
    assert table["vms"][3]["devices"][7]["board_intid"] == 223


@pytest.mark.parametrize("vms", ["0", "5", "-1"])
def test_layout_refuses_vm_counts_the_board_does_not_have(capsys, vms):
    status, out, err = run_cli(capsys, "layout", "--board", "rpi4", "--vms", vms)
    assert (status, out) == (2, "")
    assert err == f"avatar-hw: --vms {vms}: board rpi4 ({BOARDS / 'rpi4.toml'}) has 1 to 4 VMs\n"


def test_layout_reports_a_bad_board_file_in_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(RPI4.replace("irq_base = 48", "irq_base = 16"))
    status, _, err = run_cli(capsys, "layout", "--board", str(bad))
    assert status == 2
    assert err == f"avatar-hw: {bad}: layout.irq_base: must be at least 32, not 16\n"


# -- bad board files ----------------------------------------------------------------------

BOARD_SPIS = "board_intids = [[191, 207], [209, 223]]"


def edited(old, new):
    assert old in RPI4, old
    return RPI4.replace(old, new)


STUB_WITH_GIC = (RPI4[:RPI4.index("[interrupts]")] + '[interrupts]\nkind = "stub"\n'
                 + RPI4[RPI4.index("[gic]"):])


BAD = {
    "missing key": (edited("irq_base = 48 ", "#"), "layout.irq_base",
                    "missing; it must be an integer"),
    "missing table": (RPI4[:RPI4.index("[trap]")] + RPI4[RPI4.index("[ram]"):], "trap",
                      "missing; it must be a table"),
    "unknown wait mode": (edited('wait = "adaptive"', 'wait = "spin"'), "trap.wait",
                          "must be one of 'doorbell', 'adaptive', 'busy-poll', not 'spin'"),
    "wait mode not a string": (edited('wait = "adaptive"', "wait = true"), "trap.wait",
                               "must be a string, not bool True"),
    "string for a number": (edited("base = 0x0a000000", 'base = "0x0a000000"'), "layout.base",
                            "must be an integer, not str '0x0a000000'"),
    "bool for a number": (edited("max_vms = 4", "max_vms = true"), "layout.max_vms",
                          "must be an integer, not bool True"),
    "more VMs than SPIs": (edited("max_vms = 4", "max_vms = 0xFFFFFFFFFFFFFFFFFF"),
                           "layout.max_vms", "must be 1 to 988, not 4722366482869645213695"),
    "more INTIDs per VM than SPIs": (edited("irqs_per_vm = 8", "irqs_per_vm = 1000000"),
                                     "layout.irqs_per_vm", "must be 1 to 988, not 1000000"),
    "number for a string": (edited('name = "rpi4"', "name = 4"), "board.name",
                            "must be a string, not int 4"),
    "unknown key": (edited("max_vms = 4", "max_vms = 4\nmax_vm = 2"), "layout.max_vm",
                    "unknown key; expected one of base, vm_size, device_size, irq_base, "
                    "irqs_per_vm, max_vms"),
    "unknown table": (RPI4 + "\n[network]\ntap = 1\n", "network",
                      "unknown table; expected one of board, layout, interrupts, gic, trap, ram"),
    "unknown GIC version": (edited('version = "v2"', 'version = "v4"'), "gic.version",
                            "must be one of 'v2', 'v3', 'v2m', not 'v4'"),
    "unknown interrupt kind": (edited('kind = "gic"', 'kind = "msi"'), "interrupts.kind",
                               "must be one of 'gic', 'stub', not 'msi'"),
    "region without uio or file": (edited('{ uio = "avatar-gicd" }', '{ uoi = "avatar-gicd" }'),
                                   "gic.region", "needs exactly one of uio or file (uio: the "
                                                 "name of a UIO device; file: the path of a file"),
    "region with both": (edited('{ uio = "avatar-trap" }',
                                '{ uio = "avatar-trap", file = "t", size = 1 }'),
                         "trap.region", "needs exactly one of"),
    "region with a file key on uio": (edited('{ uio = "avatar-trap" }',
                                             '{ uio = "avatar-trap", size = 4096 }'),
                                      "trap.region.size", "unknown key; expected one of uio, map"),
    "file region without size": (edited('{ uio = "avatar-trap" }', '{ file = "trap.bin" }'),
                                 "trap.region.size", "missing; it must be an integer"),
    "RAM shared by VMs": (edited('"avatar-vm{vm}-ram"', '"avatar-ram"'), "ram.region.uio",
                          "'avatar-ram': each VM has its own: put {vm} in the name"),
    "trap per VM": (edited('"avatar-trap"', '"avatar-trap{vm}"'), "trap.region.uio",
                    "one region shared by all VMs: no {vm} in the name"),
    "stride on a shared region": (edited('{ uio = "avatar-trap" }',
                                         '{ file = "t", size = 1, vm_stride = 0x1000 }'),
                                  "trap.region.vm_stride", "only for a region each VM has its own"),
    "stride and {vm}": (edited('{ uio = "avatar-vm{vm}-ram" }',
                               '{ file = "ram{vm}", size = 1, vm_stride = 0x1000 }'),
                        "ram.region.vm_stride", "without {vm} in the file name"),
    "region not a table": (edited('region = { uio = "avatar-trap" }', 'region = "avatar-trap"'),
                           "trap.region", "must be a table such as { uio = ... }, not str "
                                          "'avatar-trap'"),
    "unbalanced brace": (edited('"avatar-trap"', '"avatar-{trap"'), "trap.region.uio",
                         "'avatar-{trap': expected '}' before end of string"),
    "other placeholder": (edited('"avatar-vm{vm}-ram"', '"avatar-{name}-ram"'), "ram.region.uio",
                          "the only placeholder allowed is {vm}"),
    "SPI below 32": (edited("irq_base = 48", "irq_base = 16"), "layout.irq_base",
                     "must be at least 32, not 16"),
    "IRQ past the GIC's lines": (edited("lines = 224", "lines = 70"), "layout.max_vms",
                                 "VM 3's last device would get INTID 79, past the GIC's 70 "
                                 "lines (INTIDs up to 69); lower max_vms or irqs_per_vm"),
    "IRQ in the special range": (edited("max_vms = 4 ", "max_vms = 200 ").replace(
                                     "lines = 224", "lines = 1020"), "layout.max_vms",
                                 "would get INTID 1647, past the GIC's 1020 lines"),
    "board SPI reserved by a range": (
        edited(BOARD_SPIS, "board_intids = [[175, 190], [191, 206]]"),
        "interrupts.board_intids", "INTID 175 is reserved by interrupts.reserved_intids entry "
                                   "[175, 180]: choose SPIs no device of the SoC uses"),
    "board SPI reserved by one INTID": (
        edited(BOARD_SPIS, "board_intids = [[191, 207], [208, 222]]"),
        "interrupts.board_intids", "INTID 208 is reserved by interrupts.reserved_intids entry 208"),
    "board SPI on the doorbell": (
        edited(BOARD_SPIS, "board_intids = [[181, 188], [191, 207], [209, 215]]"),
        "interrupts.board_intids",
        "INTID 185 is reserved by interrupts.doorbell_intid (the trap doorbell)"),
    "too few board SPIs": (
        edited(BOARD_SPIS, "board_intids = [[191, 205]]"), "interrupts.board_intids",
        "lists 15 INTIDs but the layout has 32 guest INTIDs (layout.max_vms 4 x irqs_per_vm 8)"),
    "board SPI twice": (
        edited(BOARD_SPIS, "board_intids = [[191, 207], [207, 221]]"), "interrupts.board_intids",
        "INTID 207 is listed twice"),
    "board SPI past the GIC's lines": (
        edited("lines = 224", "lines = 220"), "interrupts.board_intids",
        "INTID 220 is past the GIC's 220 lines"),
    "board SPI entry malformed": (
        edited(BOARD_SPIS, "board_intids = [[191, 207, 5]]"), "interrupts.board_intids[0]",
        "must be an INTID or [first, last], not [191, 207, 5]"),
    "reserved entry not an SPI": (
        edited("reserved_intids = [", "reserved_intids = [16,"), "interrupts.reserved_intids[0]",
        "16: INTIDs must be SPIs (32..1019), first <= last"),
    "reserved range backwards": (
        edited("reserved_intids = [", "reserved_intids = [[60, 50],"),
        "interrupts.reserved_intids[0]", "first <= last"),
    "board SPIs missing": (edited(BOARD_SPIS, ""), "interrupts.board_intids",
                           "missing; list the SPIs the daemon raises on this SoC"),
    "priority past a byte": (edited("priority = 0xa0", "priority = 0x100"), "interrupts.priority",
                             "must be 0..255 (a GICD_IPRIORITYR byte), not 256"),
    "GICv2 target past CPU 7": (edited("target_cpu = 1", "target_cpu = 8"),
                                "interrupts.target_cpu",
                                "8: a GICv2 targets CPU interfaces 0..7 (GICD_ITARGETSR)"),
    "target per VM of the wrong length": (edited("target_cpu = 1", "target_cpu = [1, 2]"),
                                          "interrupts.target_cpu",
                                          "has 2 entries but layout.max_vms is 4"),
    "target not a number": (edited("target_cpu = 1", 'target_cpu = "cpu1"'),
                            "interrupts.target_cpu", "must be a CPU number (or GICv3 affinity), "
                                                     "or a list of one per VM, not str 'cpu1'"),
    "target entry not a number": (edited("target_cpu = 1", 'target_cpu = [1, 2, "cpu1", 3]'),
                                  "interrupts.target_cpu", "'cpu1' is not a CPU number"),
    "doorbell reserved": (edited("doorbell_intid = 185", "doorbell_intid = 208"),
                          "interrupts.doorbell_intid",
                          "INTID 208 is reserved by interrupts.reserved_intids entry 208"),
    "doorbell past the GIC's lines": (edited("doorbell_intid = 185", "doorbell_intid = 300"),
                                      "interrupts.doorbell_intid",
                                      "INTID 300 is past the GIC's 224 lines"),
    "more devices than the window holds": (
        edited("vm_size = 0x10000", "vm_size = 0x4000"), "layout.irqs_per_vm",
        "8 devices (one per IRQ) of 0x1000 bytes need 0x8000 bytes but layout.vm_size is 0x4000: "
        "they would overlap the next VM's window"),
    "device slots not dividing the window": (edited("device_size = 0x1000", "device_size = 0x1800"),
                                             "layout.device_size",
                                             "0x1800 does not divide layout.vm_size 0x10000"),
    "device too small": (edited("device_size = 0x1000", "device_size = 0x100"),
                         "layout.device_size", "must be at least 512, not 256"),
    "window not page aligned": (edited("base = 0x0a000000", "base = 0x0a000800"), "layout.base",
                                "must be a multiple of 0x1000"),
    "GIC inside the windows": (edited("distributor = 0xff841000", "distributor = 0x0a020000"),
                               "gic.distributor", "0x0a020000-0x0a020fff lies inside the virtio "
                                                  "windows 0x0a000000-0x0a03ffff"),
    "CPU interface inside the windows": (edited("cpu_interface = 0xff842000",
                                                "cpu_interface = 0x09fff000"),
                                         "gic.cpu_interface", "0x09fff000-0x0a000fff lies inside"),
    "RAM inside the windows": (edited("guest_base = 0x40000000", "guest_base = 0x0a001000"),
                               "ram.guest_base", "lies inside the virtio windows"),
    "not TOML": ("this is not toml\n", None, "not a TOML file: "),
    "more lines than a GIC has": (edited("lines = 224", "lines = 100000"), "gic.lines",
                                  "must be 33 to 1020, not 100000"),
    "VMs' RAM overlapping": (edited('{ uio = "avatar-vm{vm}-ram" }',
                                    '{ file = "ram.bin", size = 0x2000, vm_stride = 0x1000 }'),
                             "ram.region.vm_stride", "0x1000 is less than size 0x2000: each "
                                                     "VM's part would overlap the next VM's"),
    "GIC table on a stub board": (STUB_WITH_GIC, "gic", 'only with interrupts.kind = "gic"'),
    # 64 bits: addresses, offsets and sizes, and where their ranges end
    "address past 64 bits": (edited("distributor = 0xff841000",
                                    "distributor = 0x10000000000000000"), "gic.distributor",
                             "must fit 64 bits (0 to 0xffffffffffffffff), not "
                             "0x10000000000000000"),
    "negative address": (edited("guest_base = 0x40000000", "guest_base = -4096"),
                         "ram.guest_base", "must fit 64 bits (0 to 0xffffffffffffffff), not "
                                           "-0x1000"),
    "size past 64 bits": (edited('{ uio = "avatar-trap" }',
                                 '{ file = "t", size = 0x10000000000000000 }'),
                          "trap.region.size", "must be 1 to 0xffffffffffffffff (64 bits)"),
    "offset past 64 bits": (edited('{ uio = "avatar-trap" }',
                                   '{ file = "t", size = 1, offset = 0x1fffffffffffff000 }'),
                            "trap.region.offset", "must fit 64 bits"),
    "windows ending past 64 bits": (edited("base = 0x0a000000", "base = 0xfffffffffffff000"),
                                    "layout.base", "the virtio windows (base + max_vms 4 x "
                                                   "vm_size 0x10000) would end at "
                                                   "0x1000000000003efff, past 64 bits"),
    "GIC frame ending past 64 bits": (edited("distributor = 0xff841000",
                                             "distributor = 0xfffffffffffff800"),
                                      "gic.distributor", "the distributor's frame would end at "
                                                         "0x100000000000007ff, past 64 bits"),
    "file region past 2**63": (edited('{ uio = "avatar-trap" }',
                                      '{ file = "t", offset = 0x7ffffffffffff000, size = 0x2000 }'),
                               "trap.region.offset", "would end at file offset "
                                                     "0x8000000000000fff, past 0x7fffffffffffffff"),
    "VMs' RAM past 2**63": (edited('{ uio = "avatar-vm{vm}-ram" }',
                                   '{ file = "ram.bin", size = 0x1000, '
                                   'vm_stride = 0x4000000000000000 }'),
                            "ram.region.vm_stride", "past 0x7fffffffffffffff"),
    # the key that puts a guest INTID past the GIC
    "IRQ base past the GIC's lines": (edited("irq_base = 48", "irq_base = 1000"),
                                      "layout.irq_base",
                                      "INTID 1000 is past the GIC's 224 lines (INTIDs up to 223)"),
    "IRQ base past any INTID": (edited("irq_base = 48", "irq_base = 100000000000000000000"),
                                "layout.irq_base", "INTID 100000000000000000000 is past"),
    "VM 0's IRQs past the GIC's lines": (edited("irq_base = 48", "irq_base = 220"),
                                         "layout.irqs_per_vm", "VM 0's last device would get "
                                                               "INTID 227, past the GIC's 224 "
                                                               "lines (INTIDs up to 223); lower "
                                                               "irqs_per_vm"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_board_file_is_one_line_naming_file_and_key(tmp_path, case):
    text, key, problem = BAD[case]
    path = tmp_path / "board.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_board(path)
    message = str(err.value)
    assert "\n" not in message
    where = f"{path}: {key}: " if key else f"{path}: "
    assert message.startswith(where) and problem in message[len(where):], message
    assert (err.value.file, err.value.key) == (str(path), key)


def test_gic_table_is_required_for_gic_interrupts(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(RPI4[:RPI4.index("[gic]")] + RPI4[RPI4.index("[trap]"):])
    with pytest.raises(ConfigError, match=r"board.toml: gic: missing; it must be a table$"):
        load_board(path)


def test_stub_interrupts_need_no_gic(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(RPI4[:RPI4.index("[interrupts]")] + '[interrupts]\nkind = "stub"\n' +
                    RPI4[RPI4.index("[trap]"):])
    board = load_board(path)
    assert board.interrupts == "stub" and board.gic is None
    with pytest.raises(AvatarError, match="interrupts.kind = 'stub', no \\[gic\\]"):
        board.open_gic()
    assert board.board_intid(48) == 48 and board.board_intid(79) == 79


def test_stub_interrupts_refuse_board_spi_keys(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(RPI4[:RPI4.index("[gic]")].replace('kind = "gic"', 'kind = "stub"') +
                    RPI4[RPI4.index("[trap]"):])
    with pytest.raises(ConfigError, match=r'interrupts.board_intids: only with kind = "gic": '
                                          r'with "stub" the stub injects the guest INTIDs'):
        load_board(path)


@pytest.mark.parametrize("content, problem", [
    (None, f"no such board file; shipped boards: {', '.join(shipped_boards())}"),
    (b"\xff\xfe\x00binary", "not a TOML file: "),
    ("dir", "cannot read: Is a directory")])
def test_unreadable_board_files(tmp_path, content, problem):
    path = tmp_path / "board.toml"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_board(path)
    assert str(err.value).startswith(f"{path}: {problem}") and "\n" not in str(err.value)


# -- opening regions ------------------------------------------------------------------------

def test_vm_stride_puts_each_vms_ram_in_one_file(tmp_path):
    """The emulated board's layout: VM n's RAM at offset + n * vm_stride of one file."""
    (tmp_path / "ram.bin").write_bytes(bytes(range(4)) * 0x400 + bytes([9]) * 0x3000)
    path = tmp_path / "emulated.toml"
    path.write_text(edited('{ uio = "avatar-vm{vm}-ram" }',
                           '{ file = "ram.bin", offset = 0x1000, size = 0x1000, '
                           'vm_stride = 0x2000 }'))
    board = load_board(path)
    with board.open_region(board.ram, vm=0) as ram0, board.open_region(board.ram, vm=1) as ram1:
        ram0.write32(0, 0x11111111)
        ram1.write32(0, 0x22222222)
        assert ram0.size == ram1.size == 0x1000
    data = (tmp_path / "ram.bin").read_bytes()
    assert data[0x1000:0x1004] == b"\x11" * 4 and data[0x3000:0x3004] == b"\x22" * 4
    with pytest.raises(ValueError, match="per VM: give vm"):
        board.open_region(board.ram)


def test_file_regions_resolve_relative_to_the_board_file(tmp_path):
    for name, fill in (("trap.bin", 1), ("ram0.bin", 2), ("ram1.bin", 3)):
        (tmp_path / name).write_bytes(bytes([fill]) * 0x3000)
    path = tmp_path / "emulated.toml"
    path.write_text(edited('{ uio = "avatar-trap" }', '{ file = "trap.bin", size = 0x1000 }')
                    .replace('{ uio = "avatar-vm{vm}-ram" }',
                             '{ file = "ram{vm}.bin", offset = 0x1000, size = 0x2000 }'))
    board = load_board(path)
    with board.open_region(board.trap) as trap:
        assert trap.size == 0x1000 and trap.read8(0) == 1
    with board.open_region(board.ram, vm=1) as ram:
        ram.write32(0, 0xFEEDFACE)
        assert ram.size == 0x2000 and ram.read8(0x1FFF) == 3
    assert (tmp_path / "ram1.bin").read_bytes()[0x1000:0x1004] == (0xFEEDFACE).to_bytes(4, "little")
    with pytest.raises(ValueError, match="per VM: give vm"):
        board.open_region(board.ram)
    with pytest.raises(DeviceNotFound, match=rf"^{tmp_path}/ram2.bin: no such file \(a region of "
                                             rf"board file {path}\)"):
        board.open_region(board.ram, vm=2)
    huge = replace(board.trap, size=1 << 64)      # built by a caller, not a file
    with pytest.raises(AvatarError, match=rf"^{tmp_path}/trap.bin: cannot map 0x1{'0' * 16} "
                                          "bytes at offset 0x0 .*: "):
        board.open_region(huge)


def test_uio_regions_and_the_gic_through_a_fake_tree(tmp_path):
    tree = make_tree(tmp_path, {0: ("avatar-trap", [(0x1FFF0000, 0x1000, 0, None)]),
                                1: ("avatar-vm1-ram", [(0x20000000, 0x2000, 0, None)]),
                                2: ("avatar-gicd", [(0xFF841000, 0x1000, 0, None)])})
    board = load_board(BOARDS / "rpi4.toml")
    with board.open_region(board.ram, vm=1, **tree) as ram:
        assert (ram.name, ram.phys_addr, ram.size) == ("avatar-vm1-ram", 0x20000000, 0x2000)
    with pytest.raises(DeviceNotFound, match="UIO device 'avatar-vm0-ram' not found"):
        board.open_region(board.ram, vm=0, **tree)

    gicd_node = Path(tree["dev_root"]) / "uio2"
    with open(gicd_node, "r+b") as node:
        os.pwrite(node.fileno(), (6).to_bytes(4, "little"), 4)      # GICD_TYPER: 224 lines
    line = board.interrupt_line(**tree)
    assert isinstance(line.driver, GicV2Distributor) and line.driver.lines == 224
    line.raise_intid(48)                          # guest INTID 48: board SPI 191
    assert line.regs.read32(0x214) == 1 << 31   # GICD_ISPENDR5, bit 191 % 32
    assert line.regs.read32(0x204) == 0x01010101    # the guest INTID's own bit: not written
    with pytest.raises(GicError, match="guest INTID 80 is outside the layout"):
        line.raise_intid(80)
    line.regs.close()
    with open(gicd_node, "r+b") as node:
        os.pwrite(node.fileno(), (5).to_bytes(4, "little"), 4)      # 192 lines: too few
    with pytest.raises(GicError, match=r"interrupts.board_intids uses INTID 192 but the GICv2 "
                                       r"at avatar-gicd has SPIs 32\.\.191"):
        board.open_gic(**tree)



@pytest.mark.parametrize("name", ["rpi4", "emulated", "qemu-virt"])
def test_every_key_of_a_board_file_with_odd_values_loads_or_is_one_line(tmp_path, name):
    """Each key of a shipped board file (and of its inline tables) given ints out of any
    range, empty and odd strings, lists, tables, booleans and floats in turn: the board
    loads, or one ``ConfigError`` line names the file and a key — never another exception
    (a huge max_vms built a list that long, then overflowed)."""
    tables = tomllib.loads((BOARDS / f"{name}.toml").read_text())
    path = tmp_path / "board.toml"
    keys = [(table, key, None) for table, entries in tables.items() for key in entries]
    keys += [(table, key, inner) for table, entries in tables.items()
             for key, value in entries.items() if isinstance(value, dict) for inner in value]
    for table, key, inner in keys:
        for value in ODD:
            edited = json.loads(json.dumps(tables))
            if inner is None:
                edited[table][key] = value
            else:
                edited[table][key][inner] = value
            path.write_text("".join(f"[{t}]\n" + "".join(f"{k} = {toml_value(v)}\n"
                                                        for k, v in entries.items())
                                    for t, entries in edited.items()))
            try:
                load_board(path)
            except ConfigError as err:
                message = str(err)
                assert message.startswith(f"{path}: ") and "\n" not in message, message
