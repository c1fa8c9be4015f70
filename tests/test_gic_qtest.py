"""The GIC drivers against QEMU's own GIC models (qtest), one short-lived QEMU per test.

QEMU ``virt``: GICv2 distributor 0x08000000, CPU interface 0x08010000, v2m
frame 0x08020000 (SPIs 80..143); GICv3 distributor 0x08000000. GICD_TYPER
gives 288 lines on the GICv2 and 256 on the GICv3. QEMU 7.2 cannot intercept the GIC's own
outputs, so the CPU's IRQ input is what ``irq_intercept_in`` watches.
"""

import pytest

from avatar_hw.hw.gic import (ICFGR_ATTEMPTS, GicError, GicV2Distributor, GicV2mFrame,
                              GicV3Distributor, SpiConfig, SpiSettings, open_gic)
from avatar_hw.hw.region import Region
from avatar_hw.testing.qtest import QTest, require_qemu

GICD, GICC, V2M = 0x08000000, 0x08010000, 0x08020000
GICD_CTLR, GICD_ISENABLER1, GICD_ISPENDR1, GICD_ISACTIVER1 = 0x000, 0x104, 0x204, 0x304
GICD_IPRIORITYR48, GICD_ICFGR3, GICD_IROUTER48 = 0x430, 0xC0C, 0x6000 + 8 * 48
GICC_CTLR, GICC_PMR, GICC_IAR, GICC_EOIR = 0x00, 0x04, 0x0C, 0x10
SPI48_BIT = 1 << 16

def gic_qemu(version, qmp=False):
    require_qemu()
    return QTest(["-cpu", "cortex-a57"], machine=f"virt,gic-version={version}", qmp=qmp)


def enable_cpu_path(qemu):
    """What a guest's GIC driver does first: distributor and CPU interface on, mask open."""
    qemu.writel(GICD + GICD_CTLR, 1)
    qemu.writel(GICC + GICC_CTLR, 1)
    qemu.writel(GICC + GICC_PMR, 0xFF)


def enable_spi48_path(qemu):
    """The CPU path and SPI 48 enabled."""
    enable_cpu_path(qemu)
    qemu.writel(GICD + GICD_ISENABLER1, SPI48_BIT)


@pytest.mark.qemu
def test_v2_raise_sets_ispendr1_bit16_and_clear_clears_it():
    with gic_qemu(2) as qemu:
        gicd = GicV2Distributor(qemu.window(GICD))
        assert gicd.lines == 288 and gicd.spi_range == range(32, 288)
        gicd.raise_spi(48)
        assert qemu.readl(GICD + GICD_ISPENDR1) == SPI48_BIT
        assert gicd.is_pending(48)
        gicd.clear_spi(48)
        assert qemu.readl(GICD + GICD_ISPENDR1) == 0
        assert not gicd.is_pending(48)


@pytest.mark.qemu
def test_v2_signalled_spi_raises_cpu_irq_and_iar_reads_48():
    with gic_qemu(2, qmp=True) as qemu:
        [cpu] = qemu.find_devices("-arm-cpu")
        qemu.irq_intercept_in(cpu)
        gicd = GicV2Distributor(qemu.window(GICD))
        enable_spi48_path(qemu)
        assert qemu.irq_events == []
        gicd.raise_spi(48)
        qemu.wait_irq("raise", 0, timeout=30)
        assert qemu.readl(GICC + GICC_IAR) == 48
        assert gicd.diagnose_spi(48).active
        qemu.writel(GICC + GICC_EOIR, 48)
        assert not gicd.diagnose_spi(48).active
        assert qemu.readl(GICC + GICC_IAR) == 1023      # nothing else pending


@pytest.mark.qemu
def test_v2_diagnose_reports_each_reason():
    with gic_qemu(2) as qemu:
        gicd = GicV2Distributor(qemu.window(GICD))
        report = gicd.diagnose_spi(48)
        assert (report.distributor_enabled, report.enabled, report.pending, report.active) == \
            (False, False, False, False)
        assert report.trigger == "level" and report.priority == 0
        assert report.targets == (0,)          # one CPU: GICD_ITARGETSR reads as zero
        text = report.explain()
        assert "distributor is disabled" in text and "SPI is disabled" in text

        enable_spi48_path(qemu)
        qemu.writel(GICD + GICD_ICFGR3, 0x2)               # INTID 48 edge-triggered
        qemu.writel(GICD + GICD_IPRIORITYR48, 0xA0)
        gicd.raise_spi(48)
        report = gicd.diagnose_spi(48)
        assert (report.distributor_enabled, report.enabled, report.pending) == (True, True, True)
        assert report.trigger == "edge" and report.priority == 0xA0
        assert report.problems() == []
        assert "distributor forwards it" in report.explain()

        assert qemu.readl(GICC + GICC_IAR) == 48
        report = gicd.diagnose_spi(48)
        assert report.active and not report.pending         # edge: acknowledged, no longer pending
        assert "is active" in report.explain()


@pytest.mark.qemu
def test_v2_refuses_intids_outside_its_spis_without_writing():
    with gic_qemu(2) as qemu:
        gicd = GicV2Distributor(qemu.window(GICD))
        for intid in (0, 15, 31, 288, 1020, 1023):
            with pytest.raises(GicError, match=f"INTID {intid} is outside its SPIs 32..287"):
                gicd.raise_spi(intid)
            with pytest.raises(GicError):
                gicd.clear_spi(intid)
        assert [qemu.readl(GICD + 0x200 + 4 * n) for n in range(9)] == [0] * 9


@pytest.mark.qemu
def test_v3_raise_and_clear_spi_48():
    with gic_qemu(3) as qemu:
        gicd = open_gic("v3", qemu.window(GICD))
        assert isinstance(gicd, GicV3Distributor) and gicd.lines == 256
        if not gicd.message_based:
            # QEMU 7.2: no GICD_TYPER.MBIS, and a SETSPI_NSR write is ignored, which is
            # why the driver uses GICD_ISPENDR there.
            qemu.writel(GICD + 0x040, 48)
            assert qemu.readl(GICD + GICD_ISPENDR1) == 0
        gicd.raise_spi(48)
        assert qemu.readl(GICD + GICD_ISPENDR1) == SPI48_BIT
        assert gicd.diagnose_spi(48).pending
        gicd.clear_spi(48)
        assert qemu.readl(GICD + GICD_ISPENDR1) == 0
        with pytest.raises(GicError, match="INTID 300"):
            gicd.raise_spi(300)


@pytest.mark.qemu
def test_v3_diagnose_reports_affinity_route():
    with gic_qemu(3) as qemu:
        gicd = GicV3Distributor(qemu.window(GICD))
        report = gicd.diagnose_spi(48)
        assert report.gic == "v3" and report.targets is None
        assert report.route == "CPU with affinity 0.0.0.0"
        qemu.writel(GICD + GICD_IROUTER48, 1 << 31)
        assert gicd.diagnose_spi(48).route == "any CPU (GICD_IROUTER.IRM = 1)"
        qemu.writel(GICD + GICD_CTLR, 0x2)                  # EnableGrp1NS
        qemu.writel(GICD + GICD_ISENABLER1, SPI48_BIT)
        gicd.raise_spi(48)
        report = gicd.diagnose_spi(48)
        assert report.distributor_enabled and report.enabled and report.pending
        assert report.problems() == []


@pytest.mark.qemu
def test_v2m_frame_raises_its_spis_only():
    with gic_qemu(2) as qemu:
        frame = open_gic("v2m", qemu.window(V2M))
        assert isinstance(frame, GicV2mFrame) and frame.spi_range == range(80, 144)
        gicd = GicV2Distributor(qemu.window(GICD))
        qemu.writel(GICD + 0xC14, 0x2)          # INTID 80 edge-triggered, as Linux sets MSIs
        frame.raise_spi(80)
        assert gicd.is_pending(80)
        frame.clear_spi(80)                     # edge-only: documented no-op
        assert gicd.is_pending(80)
        with pytest.raises(GicError, match="INTID 48 is outside its SPIs 80..143"):
            frame.raise_spi(48)
        with pytest.raises(GicError):
            frame.clear_spi(144)


def test_v3_with_message_based_spis_writes_setspi_and_clrspi():
    """No peer implements MBIS here: a bytearray shows which register gets the INTID."""
    regs = Region(bytearray(0x10000), name="gicd")
    regs.write32(0x004, (1 << 16) | 7)          # MBIS, 256 lines
    gicd = GicV3Distributor(regs)
    assert gicd.message_based
    gicd.raise_spi(48)
    assert regs.read32(0x040) == 48 and regs.read32(GICD_ISPENDR1) == 0
    gicd.clear_spi(49)
    assert regs.read32(0x048) == 49


def test_open_gic_unknown_version():
    with pytest.raises(GicError, match="unknown GIC version 'v4'"):
        open_gic("v4", Region(bytearray(0x1000)))


# -- configuring board SPIs: what the daemon does at start, and what diagnose sees later -------

GICD_ICENABLER6, GICD_ISENABLER6, GICD_ICFGR13 = 0x198, 0x118, 0xC34
SPI217_BIT, SPI217_EDGE = 1 << 25, 2 << 18        # 217 % 32 = 25; field 217 % 16 = 9


def linux_like_reset(qemu, intid=217):
    """An SPI someone else set up later (Linux requesting it): disabled, level, priority 0x80."""
    qemu.writel(GICD + GICD_ICENABLER6, SPI217_BIT)
    qemu.writel(GICD + GICD_ICFGR13, 0)
    qemu.writeb(GICD + 0x400 + intid, 0x80)


@pytest.mark.qemu
def test_v2_configure_spi_sets_enable_edge_and_priority_and_reports_later_changes():
    """One CPU: QEMU 7.2's GICv2 dereferences the current CPU on a qtest access when it has
    more than one, so GICD_ITARGETSR (read-as-zero with one CPU) is shown on a bytearray below."""
    with gic_qemu(2) as qemu:
        gicd = GicV2Distributor(qemu.window(GICD))
        linux_like_reset(qemu)
        settings = gicd.configure_spi(217, SpiConfig(priority=0xA0, target=0))
        assert qemu.readl(GICD + GICD_ISENABLER6) & SPI217_BIT
        assert qemu.readl(GICD + GICD_ICFGR13) & SPI217_EDGE
        assert qemu.readb(GICD + 0x400 + 217) == 0xA0
        assert settings == SpiSettings(enabled=True, trigger="edge", priority=0xA0, targets=(0,))
        assert gicd.expected_settings(SpiConfig(0xA0, 0)) == settings
        report = gicd.diagnose_spi(217)
        assert report.configured == settings and report.changes() == []
        assert "changed since" not in report.explain()

        linux_like_reset(qemu)                  # e.g. a Linux driver requested INTID 217
        report = gicd.diagnose_spi(217)
        assert report.changes() == [
            "disabled (configured: enabled)", "level-triggered (configured: edge-triggered)",
            "priority 0x80 (configured: priority 0xa0)"]
        text = report.explain()
        assert "\n" not in text and ("changed since avatar-hw configured it (Linux or the "
                                     "hypervisor wrote the distributor): disabled") in text
        # Another process (the HIL plugin) compares with the board file's settings instead.
        other = GicV2Distributor(qemu.window(GICD))
        assert other.diagnose_spi(217, other.expected_settings(SpiConfig(0xA0, 0))).changes() \
            == report.changes()


def test_v2_configure_spi_targets_one_cpu_with_a_byte_write():
    regs = Region(bytearray(0x1000), name="gicd")
    regs.write32(0x004, 7 | 3 << 5)             # 256 lines, 4 CPUs
    regs.write32(0x800 + 216, 0x01010101)       # INTIDs 216..219 target CPU 0
    gicd = GicV2Distributor(regs)
    assert gicd.configure_spi(217, SpiConfig(priority=0xA0, target=2)).targets == (2,)
    assert regs.read32(0x800 + 216) == 0x01010401       # only INTID 217's byte changed
    regs.write8(0x800 + 217, 0x01)
    assert gicd.diagnose_spi(217).changes() == ["targets CPUs [0] (configured: targets CPUs [2])"]


@pytest.mark.qemu
def test_v2_configured_spi_reaches_the_cpu_where_the_reset_state_does_not():
    with gic_qemu(2, qmp=True) as qemu:
        [cpu] = qemu.find_devices("-arm-cpu")
        qemu.irq_intercept_in(cpu)
        gicd = GicV2Distributor(qemu.window(GICD))
        enable_cpu_path(qemu)
        linux_like_reset(qemu)
        gicd.raise_spi(217)                     # disabled: pending, but never signalled
        assert qemu.irq_events == [] and "SPI is disabled" in gicd.diagnose_spi(217).explain()
        gicd.clear_spi(217)
        gicd.configure_spi(217, SpiConfig(priority=0xA0, target=0))
        gicd.raise_spi(217)
        qemu.wait_irq("raise", 0, timeout=30)
        assert qemu.readl(GICC + GICC_IAR) == 217
        assert not gicd.is_pending(217)         # edge-triggered: acknowledging ends pending
        qemu.writel(GICC + GICC_EOIR, 217)


@pytest.mark.qemu
def test_v3_configure_spi_routes_with_irouter_and_reports_a_changed_route():
    require_qemu()
    with QTest(["-cpu", "cortex-a57", "-smp", "2"], machine="virt,gic-version=3") as qemu:
        gicd = GicV3Distributor(qemu.window(GICD))
        settings = gicd.configure_spi(217, SpiConfig(priority=0x90, target=1))   # Aff0 = 1
        assert qemu.readl(GICD + 0x6000 + 8 * 217) == 1
        assert qemu.readl(GICD + 0x6000 + 8 * 217 + 4) == 0
        assert settings.route == "CPU with affinity 0.0.0.1" and settings.trigger == "edge"
        assert settings.enabled and settings.priority == 0x90
        qemu.writel(GICD + 0x6000 + 8 * 217, 1 << 31)                        # IRM: any CPU
        assert gicd.diagnose_spi(217).changes() == [
            "routed to any CPU (GICD_IROUTER.IRM = 1) (configured: routed to CPU with "
            "affinity 0.0.0.1)"]


def test_v3_configure_spi_writes_both_irouter_halves():
    """QEMU's CPUs all have Aff3..Aff1 = 0: a bytearray shows the upper affinity fields."""
    regs = Region(bytearray(0x10000), name="gicd")
    regs.write32(0x004, 7)                      # 256 lines
    regs.write32(GICD_CTLR, 0x30)               # affinity routing enabled
    gicd = GicV3Distributor(regs)
    settings = gicd.configure_spi(217, SpiConfig(priority=0xA0, target=0x01_00020304))
    assert regs.read32(0x6000 + 8 * 217) == 0x00020304 and regs.read32(0x6004 + 8 * 217) == 1
    assert settings.route == "CPU with affinity 1.2.3.4"
    assert regs.read32(0x180 + 4 * 6) == SPI217_BIT         # disabled before the trigger change
    assert regs.read32(0x100 + 4 * 6) == SPI217_BIT         # then enabled
    assert regs.read8(0x400 + 217) == 0xA0 and regs.read32(GICD_ICFGR13) == SPI217_EDGE


class SharedWord:
    """A GICv2 distributor in a bytearray that counts GICD_ICFGR13 writes; after our n-th,
    Linux writes ``linux[n - 1]`` to the word (gic_configure_irq may, at any time)."""

    def __init__(self, icfgr13=0, linux=()):
        self.regs = Region(bytearray(0x1000), name="gicd")
        self.regs.write32(0x004, 7)                 # 256 lines, one CPU
        self.regs.write32(GICD_ICFGR13, icfgr13)
        self.linux, self.icfgr_writes = list(linux), 0

    def __getattr__(self, name):
        return getattr(self.regs, name)

    def write32(self, offset, value):
        self.regs.write32(offset, value)
        if offset == GICD_ICFGR13:
            self.icfgr_writes += 1
            if self.linux:
                self.regs.write32(offset, self.linux.pop(0))


SPI216_EDGE = 2 << 16                               # INTID 216, a neighbour Linux owns


def test_v2_configure_spi_leaves_an_edge_spis_icfgr_word_alone():
    gicd = SharedWord(icfgr13=SPI217_EDGE)
    assert GicV2Distributor(gicd).configure_spi(217, SpiConfig(0xA0, 0)).trigger == "edge"
    assert gicd.icfgr_writes == 0


def test_v2_configure_spi_writes_icfgr_again_when_linux_wrote_the_word_after_it():
    """Linux read the word before our write and wrote it after, with INTID 216 now edge and
    ours level: our bit is set again on top of Linux's, which stays."""
    gicd = SharedWord(linux=[SPI216_EDGE])
    assert GicV2Distributor(gicd).configure_spi(217, SpiConfig(0xA0, 0)).trigger == "edge"
    assert gicd.icfgr_writes == 2
    assert gicd.read32(GICD_ICFGR13) == SPI216_EDGE | SPI217_EDGE


def test_v2_configure_spi_stops_writing_icfgr_after_a_bounded_number_of_attempts():
    """A word whose edge bit never stays (a GIC that ignores it, or Linux writing on and on):
    the read-back says level, which the daemon logs, and the loop ends."""
    gicd = SharedWord(linux=[0] * (ICFGR_ATTEMPTS + 1))
    assert GicV2Distributor(gicd).configure_spi(217, SpiConfig(0xA0, 0)).trigger == "level"
    assert gicd.icfgr_writes == ICFGR_ATTEMPTS


@pytest.mark.qemu
def test_qtest_and_qmp_sockets_in_a_temporary_directory_with_a_comma(monkeypatch):
    """``-qtest unix:PATH`` and ``-qmp unix:PATH`` split PATH at a comma unless it is doubled."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="t,") as tmp:
        monkeypatch.setattr(tempfile, "tempdir", tmp)
        with gic_qemu(2, qmp=True) as qemu:
            assert qemu._dir.startswith(tmp + "/")
            assert qemu.readl(GICD + GICD_ISPENDR1) == 0
