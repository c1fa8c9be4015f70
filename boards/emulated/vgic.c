/*
 * vgic.c - minimal GICv2 virtualisation: one guest vCPU per physical CPU.
 *
 * The distributor is shared (CPU0 sets it up once; SPIs target CPU0, which
 * owns the stub's UART); the CPU interface, GICH and GICV are banked per CPU,
 * and each CPU keeps its own guest's virtual distributor state (struct vgic).
 * CPU0 wakes another CPU with KICK_SGI when the host asked for that CPU's
 * guest interrupts (trap.c).
 *
 * Physical side (owned by the stub): the distributor and CPU interface take
 * every physical IRQ to EL2 (HCR_EL2.IMO). The guest's timer PPIs are
 * forwarded without the list registers' HW bit: the stub acknowledges and
 * deactivates the physical PPI, disables it at the distributor, and injects
 * a virtual one with the LR's EOI bit; the guest's EOI raises a maintenance
 * interrupt and the stub enables the PPI again (it fires again if the timer
 * condition still holds). The HW-bit design (the guest's virtual EOI
 * deactivating the physical interrupt) loses timer interrupts on QEMU 7.2:
 * its GICv2 does not re-evaluate the physical CPU interface after such a
 * deactivation, so a level that is already high again stays unseen and the
 * guest sleeps forever in WFI (seen about one boot in five).
 *
 * Guest side: the guest's GICC address is GICV, mapped by stage 2, so its
 * CPU-interface accesses go to the hardware virtual interface. Its
 * distributor is *emulated* here (the physical one is not mapped): enables,
 * pending, priorities, targets, config and SGIR are kept in software, and an
 * enable of a pass-through PPI (timers) is mirrored to the physical GICD. The
 * guest therefore cannot disable the stub's own UART or maintenance
 * interrupts. INTIDs 0..95 exist (GICD_TYPER.ITLinesNumber = 2).
 *
 * The stub's own waits sleep in WFI bounded by the EL2 physical timer (cpu_sleep): its
 * PPI is enabled on every guest CPU, its timer enabled only while the CPU sleeps.
 *
 * Pending virtual interrupts wait in sw_pending until a list register is
 * free; when they do not fit, GICH_HCR.UIE asks for a maintenance interrupt.
 */
#include "stub.h"

#define NR_VIRQ      NR_GUEST_INTIDS
#define NR_VIRQ_WORDS (NR_VIRQ / 32)

#define GICD_CTLR       0x000
#define GICD_TYPER      0x004
#define GICD_ISENABLER  0x100
#define GICD_ICENABLER  0x180
#define GICD_ICPENDR    0x280
#define GICD_IPRIORITYR 0x400
#define GICD_ITARGETSR  0x800
#define GICD_SGIR       0xf00

#define GICC_CTLR 0x00
#define GICC_PMR  0x04
#define GICC_BPR  0x08
#define GICC_IAR  0x0c
#define GICC_EOIR 0x10
#define GICC_DIR  0x1000

#define GICH_HCR   0x00
#define GICH_VTR   0x04
#define GICH_EISR0  0x20
#define GICH_ELRSR0 0x30
#define GICH_LR0   0x100
#define HCR_EN     (1u << 0)
#define HCR_UIE    (1u << 1)
#define LR_PENDING (1u << 28)
#define LR_ACTIVE  (2u << 28)
#define LR_STATE   (3u << 28)
#define LR_EOI     (1u << 19)

/* Guest PPIs backed by a physical interrupt: non-secure physical and virtual timer. */
#define PASSTHROUGH_PPIS ((1u << 30) | (1u << 27))
#define STUB_PRIORITY 0xa0

struct vgic {
    u32 vctlr;
    u32 venabled[NR_VIRQ_WORDS];
    u32 sw_pending[NR_VIRQ_WORDS];
    u8 vpriority[NR_VIRQ];
    u8 vtarget[NR_VIRQ];
    u32 vconfig[NR_VIRQ / 16];
    u32 ppis_in_guest;      /* pass-through PPIs held disabled until the guest's EOI */
};

static struct vgic vgics[MAX_VMS];
static u32 nr_lrs;

static struct vgic *this_vgic(void) { return &vgics[cpu_index()]; }

static u64 lr_addr(u32 i) { return GICH_BASE + GICH_LR0 + 4 * i; }

static void phys_set_priority_target(u32 intid)
{
    u64 word = GICD_BASE + GICD_IPRIORITYR + (intid & ~3u);
    u32 shift = (intid & 3) * 8;
    mmio_write32(word, (mmio_read32(word) & ~(0xffu << shift)) | (STUB_PRIORITY << shift));
    if (intid >= 32) {
        word = GICD_BASE + GICD_ITARGETSR + (intid & ~3u);
        mmio_write32(word, (mmio_read32(word) & ~(0xffu << shift)) | (1u << shift));
    }
}

/* Once, on CPU0: every SPI disabled, the UART's routed to CPU0. */
void vgic_init_distributor(void)
{
    u32 lines = ((mmio_read32(GICD_BASE + GICD_TYPER) & 0x1f) + 1) * 32;
    mmio_write32(GICD_BASE + GICD_CTLR, 0);
    for (u32 i = 1; i < lines / 32; i++) {
        mmio_write32(GICD_BASE + GICD_ICENABLER + 4 * i, 0xffffffffu);
        mmio_write32(GICD_BASE + GICD_ICPENDR + 4 * i, 0xffffffffu);
    }
    if (!board_linux) {   /* in board mode the SPIs are the board Linux's (and the daemon's) */
        phys_set_priority_target(UART_INTID);
        mmio_write32(GICD_BASE + GICD_ISENABLER + 4 * (UART_INTID / 32), 1u << (UART_INTID % 32));
    }
    mmio_write32(GICD_BASE + GICD_CTLR, 1);
    nr_lrs = (mmio_read32(GICH_BASE + GICH_VTR) & 0x3f) + 1;
    log_printf("GICv2: %u lines, %u list registers, guest distributors emulated", lines, nr_lrs);
}

/* On each CPU: its banked SGIs/PPIs, CPU interface and GICH, and its guest's state. */
void vgic_init_cpu(void)
{
    struct vgic *g = this_vgic();
    mmio_write32(GICD_BASE + GICD_ICENABLER, 0xffffffffu);
    mmio_write32(GICD_BASE + GICD_ICPENDR, 0xffffffffu);
    phys_set_priority_target(MAINT_INTID);
    phys_set_priority_target(KICK_SGI);
    phys_set_priority_target(27);
    phys_set_priority_target(30);
    phys_set_priority_target(HYP_TIMER_INTID);
    write_sysreg(cnthp_ctl_el2, 0);          /* ENABLE resets to an UNKNOWN value */
    isb();
    mmio_write32(GICD_BASE + GICD_ISENABLER,
                 (1u << MAINT_INTID) | (1u << KICK_SGI) | (1u << HYP_TIMER_INTID));
    mmio_write32(GICC_BASE + GICC_PMR, 0xff);
    mmio_write32(GICC_BASE + GICC_BPR, 0);
    mmio_write32(GICC_BASE + GICC_CTLR, 1u | (1u << 9));   /* EnableGrp0, EOImode */

    for (u32 i = 0; i < nr_lrs; i++)
        mmio_write32(lr_addr(i), 0);
    mmio_write32(GICH_BASE + GICH_HCR, HCR_EN);
    g->venabled[0] = 0xffff;                                /* SGIs are always enabled */
    for (u32 i = 0; i < NR_VIRQ; i++)
        g->vtarget[i] = 1;
}

/*
 * Sleep for at most ``ticks`` of the counter: WFI, woken by the EL2 physical timer (CNTHP,
 * PPI HYP_TIMER_INTID) or earlier by any other interrupt pending for this CPU. The stub runs
 * with PSTATE.I set; WFI still wakes: an IRQ the CPU interface signals is a WFI wake-up
 * event whatever PSTATE.{A,I,F} say (Arm ARM D1, "Wait For Interrupt"), and it is not taken
 * here (it stays pending for the guest's return, or is the timer's, cleared below). Callers
 * re-check what they wait for: a wake-up may be early. Under TCG the halted vCPU's host
 * thread sleeps too, instead of spinning (docs/emulated-board.md, "The stub's waits").
 */
void cpu_sleep(u64 ticks)
{
    write_sysreg(cnthp_cval_el2, counter() + ticks);
    write_sysreg(cnthp_ctl_el2, 1);          /* ENABLE, IMASK clear */
    isb();
    __asm__ volatile("dsb sy\n\twfi" ::: "memory");
    write_sysreg(cnthp_ctl_el2, 0);          /* the timer's level output goes low ... */
    isb();
    /* ... and a pending state QEMU's GICv2 latched from it is cleared (on a GIC-400 a level
     * interrupt's pending state follows the line: nothing left to clear). */
    mmio_write32(GICD_BASE + GICD_ICPENDR, 1u << HYP_TIMER_INTID);
}

/* Physical SGI to ``cpu`` (its CPU interface number is its index on QEMU virt). */
void vgic_kick(u32 cpu)
{
    mmio_write32(GICD_BASE + GICD_SGIR, (1u << (16 + cpu)) | KICK_SGI);
}

/* Put intid in a list register; 0 when none is free. */
static int inject(u32 intid)
{
    struct vgic *g = this_vgic();
    for (u32 i = 0; i < nr_lrs; i++) {
        u32 lr = mmio_read32(lr_addr(i));
        if ((lr & LR_STATE) && (lr & 0x3ff) == intid) {
            /* Already listed: pending merges (edge); active gets pending too. */
            if ((lr & LR_STATE) == LR_ACTIVE)
                mmio_write32(lr_addr(i), lr | LR_PENDING);
            return 1;
        }
    }
    /* ELRSR: invalid and no EOI maintenance still to be taken for it. */
    u32 empty = mmio_read32(GICH_BASE + GICH_ELRSR0) & ((1u << nr_lrs) - 1);
    if (!empty)
        return 0;
    u32 lr = intid | ((u32)(g->vpriority[intid] >> 3) << 23) | LR_PENDING;
    if (intid < 32 && ((1u << intid) & PASSTHROUGH_PPIS))
        lr |= LR_EOI;
    mmio_write32(lr_addr((u32)__builtin_ctz(empty)), lr);
    return 1;
}

/* EOI maintenance: the guest finished a pass-through PPI; enable it again. */
static void handle_maintenance(void)
{
    struct vgic *g = this_vgic();
    u32 eisr = mmio_read32(GICH_BASE + GICH_EISR0);
    while (eisr) {
        u32 i = (u32)__builtin_ctz(eisr);
        eisr &= eisr - 1;
        u32 intid = mmio_read32(lr_addr(i)) & 0x3ff;
        mmio_write32(lr_addr(i), 0);
        if (intid < 32 && ((1u << intid) & g->ppis_in_guest)) {
            g->ppis_in_guest &= ~(1u << intid);
            if (g->venabled[0] & (1u << intid))
                mmio_write32(GICD_BASE + GICD_ISENABLER, 1u << intid);
        }
    }
}

void vgic_flush(void)
{
    struct vgic *g = this_vgic();
    int left = 0;
    if (g->vctlr & 1) {
        for (u32 w = 0; w < NR_VIRQ_WORDS; w++) {
            u32 bits = g->sw_pending[w] & g->venabled[w];
            while (bits) {
                u32 bit = (u32)__builtin_ctz(bits);
                bits &= bits - 1;
                if (inject(w * 32 + bit))
                    g->sw_pending[w] &= ~(1u << bit);
                else
                    left = 1;
            }
        }
    }
    mmio_write32(GICH_BASE + GICH_HCR, HCR_EN | (left ? HCR_UIE : 0));
}

void vgic_request(u32 word, u32 bits)
{
    struct vgic *g = this_vgic();
    if (!bits)
        return;
    if (word == 0 || word >= NR_VIRQ_WORDS) {
        log_printf("model asked for INTIDs 0x%x of word %u: only SPIs 32..%u exist, ignored",
                   bits, word, NR_VIRQ - 1);
        return;
    }
    g->sw_pending[word] |= bits;
}

void vgic_handle_irq(void)
{
    struct vgic *g = this_vgic();
    for (;;) {
        u32 iar = mmio_read32(GICC_BASE + GICC_IAR);
        u32 intid = iar & 0x3ff;
        if (intid >= 1020)
            break;
        mmio_write32(GICC_BASE + GICC_EOIR, iar);   /* priority drop */
        if (intid < 32 && ((1u << intid) & PASSTHROUGH_PPIS)) {
            mmio_write32(GICD_BASE + GICD_ICENABLER, 1u << intid);
            g->ppis_in_guest |= 1u << intid;
            g->sw_pending[0] |= 1u << intid;
        } else if (intid == UART_INTID) {
            trap_take_rings();
        } else if (intid == KICK_SGI) {
            /* nothing: the caller takes this VM's virq_pending bits next */
        } else if (intid == MAINT_INTID) {
            handle_maintenance();
        } else if (intid == HYP_TIMER_INTID) {
            /* a cpu_sleep's bound that fired as it ended: nothing to do */
        } else if (!board_irq(intid)) {
            log_printf("unexpected physical interrupt %u", intid);
        }
        mmio_write32(GICC_BASE + GICC_DIR, iar);
    }
}

/* A CPU whose guest powered off: its timers off, it keeps serving physical
 * interrupts (CPU0 keeps forwarding the host's doorbells to the other CPUs). */
void vgic_park(void)
{
    mmio_write32(GICD_BASE + GICD_ICENABLER, PASSTHROUGH_PPIS);
    for (u32 i = 0; i < nr_lrs; i++)
        mmio_write32(lr_addr(i), 0);
    for (;;) {
        __asm__ volatile("wfi");
        vgic_handle_irq();
        trap_take_virq_requests();      /* and drop them: no guest runs here any more */
        for (u32 w = 0; w < NR_VIRQ_WORDS; w++)
            this_vgic()->sw_pending[w] = 0;
    }
}

/* Mirror the guest's enables of pass-through PPIs to the physical distributor. */
static void sync_passthrough(u32 set, u32 clear)
{
    struct vgic *g = this_vgic();
    if (set & PASSTHROUGH_PPIS & ~g->ppis_in_guest)
        mmio_write32(GICD_BASE + GICD_ISENABLER, set & PASSTHROUGH_PPIS & ~g->ppis_in_guest);
    if (clear & PASSTHROUGH_PPIS)
        mmio_write32(GICD_BASE + GICD_ICENABLER, clear & PASSTHROUGH_PPIS);
}

static u32 byte_reg_read(const u8 *array, u32 first, u32 size)
{
    u32 v = 0;
    for (u32 i = 0; i < size; i++)
        if (first + i < NR_VIRQ)
            v |= (u32)array[first + i] << (8 * i);
    return v;
}

static void byte_reg_write(u8 *array, u32 first, u32 size, u32 v, u32 writable_from)
{
    for (u32 i = 0; i < size; i++)
        if (first + i >= writable_from && first + i < NR_VIRQ)
            array[first + i] = (u8)(v >> (8 * i));
}

/* Emulate a guest access to its distributor; returns 0 for an access size the GIC forbids. */
int vgic_dist_access(u64 offset, u32 size, int is_write, u64 *value)
{
    struct vgic *g = this_vgic();
    u32 v = (u32)*value, r = 0;
    u32 word = (u32)(offset & 0x7f) / 4;
    if (offset >= GICD_IPRIORITYR && offset < GICD_IPRIORITYR + 0x400) {
        u32 first = (u32)(offset - GICD_IPRIORITYR);
        if (is_write)
            byte_reg_write(g->vpriority, first, size, v, 0);
        else
            r = byte_reg_read(g->vpriority, first, size);
    } else if (offset >= GICD_ITARGETSR && offset < GICD_ITARGETSR + 0x400) {
        u32 first = (u32)(offset - GICD_ITARGETSR);
        if (is_write)
            byte_reg_write(g->vtarget, first, size, v, 32);
        else
            r = byte_reg_read(g->vtarget, first, size);
    } else if (size != 4) {
        return 0;
    } else if (offset == GICD_CTLR) {
        if (is_write)
            g->vctlr = v & 1;
        r = g->vctlr;
    } else if (offset == GICD_TYPER) {
        r = NR_VIRQ / 32 - 1;                        /* one CPU, no security extensions */
    } else if (offset == 0x008) {
        r = 0x0200043b;                              /* GICD_IIDR: ARM, GICv2 */
    } else if (offset >= 0x100 && offset < 0x180 && word < NR_VIRQ_WORDS) {   /* ISENABLER */
        if (is_write) {
            g->venabled[word] |= v;
            if (word == 0)
                sync_passthrough(v, 0);
        }
        r = g->venabled[word];
    } else if (offset >= 0x180 && offset < 0x200 && word < NR_VIRQ_WORDS) {   /* ICENABLER */
        if (is_write) {
            u32 clear = word == 0 ? v & ~0xffffu : v;
            g->venabled[word] &= ~clear;
            if (word == 0)
                sync_passthrough(0, clear);
        }
        r = g->venabled[word];
    } else if (offset >= 0x200 && offset < 0x280 && word < NR_VIRQ_WORDS) {   /* ISPENDR */
        if (is_write)
            g->sw_pending[word] |= word == 0 ? v & ~PASSTHROUGH_PPIS : v;
        r = g->sw_pending[word];
    } else if (offset >= 0x280 && offset < 0x300 && word < NR_VIRQ_WORDS) {   /* ICPENDR */
        if (is_write)
            g->sw_pending[word] &= ~v;
        r = g->sw_pending[word];
    } else if (offset >= 0xc00 && offset < 0xd00) {                            /* ICFGR */
        u32 n = (u32)(offset - 0xc00) / 4;
        if (n < NR_VIRQ / 16) {
            if (is_write && n >= 2)
                g->vconfig[n] = v;
            r = n == 0 ? 0xaaaaaaaau : g->vconfig[n];
        }
    } else if (offset == GICD_SGIR) {
        u32 filter = (v >> 24) & 3;
        if (is_write && (filter == 2 || (filter == 0 && (v & (1u << 16)))))
            g->sw_pending[0] |= 1u << (v & 0xf);
    } else if (offset == 0xfe8) {
        r = 0x2b;                                    /* GICD_PIDR2: architecture version 2 */
    }
    if (!is_write)
        *value = r;
    return 1;
}
