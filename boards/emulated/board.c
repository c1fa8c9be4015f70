/*
 * board.c - board mode: CPU0 runs the board's own Linux, CPU1.. the guests.
 *
 * Static partitioning, as Avatar does on a Pi 4: when the host loads a
 * struct board_params at BOARD_PARAMS_ADDR, VM 0's boot parameters describe
 * the *board Linux* rather than a guest. CPU0 then enters it at EL1 with
 * HCR_EL2 = VM | RW only: IMO/FMO clear, so its physical IRQs go straight to
 * EL1 and the GIC (distributor and CPU0's banked CPU interface) is its own;
 * no TSC, so its PSCI calls reach QEMU (its power-off ends the board). Its
 * stage 2 (VMID 1) maps, identity:
 *   its RAM (VM 0's ram_base/ram_size)   Normal write-back, 2 MiB blocks
 *   the trap region (TRAP_REGION_SIZE)   Normal write-back  } the carve-out, reached
 *   each guest's RAM (VM n's ram_phys)   Normal write-back  } only through avatar_uio
 *   GICD and GICC (physical)             Device, 4 KiB pages
 *   QEMU's virtio-mmio (0x0a000000)      Device, 2 MiB: the board's own console
 * and nothing else: the stub and its boot parameters (after the trap region)
 * stay out of its reach (a stage-2 fault, logged, and an
 * external abort injected into the board Linux).
 *
 * Doorbells and interrupts go through the distributor, as on the board:
 *   - board_ring_doorbell(): a guest CPU posts a trap while the model sleeps ->
 *     GICD_ISPENDR of the trap SPI (the board Linux routed it to CPU0 itself;
 *     avatar_uio's handler wakes the daemon's read() on /dev/uioN);
 *   - board_irq(): the daemon wrote GICD_ISPENDR of a board SPI, which it
 *     targeted at the guest's CPU (BoardInterruptLine); that CPU takes it at
 *     EL2 (IMO set there), and the stub injects the guest INTID through a list
 *     register. virq_pending is not used (stub_features: posted writes and
 *     register shadows, no AVT_F_VIRQ_REQUEST).
 */
#include "stub.h"

#define BOARD_PARAMS_ADDR  (BOOT_PARAMS_ADDR + 0x800)
#define BOARD_PARAMS_MAGIC 0x4c425641u   /* "AVBL" */
#define GICD_ISPENDR 0x200
#define VIRTIO_MMIO_BASE 0x0a000000ull   /* QEMU's own transports: the board's console */

struct board_params {
    u32 magic;
    u32 doorbell_intid;     /* the trap SPI (the avatar-trap node's interrupt) */
    u32 board_intid_base;   /* board SPI of guest INTID guest_intid_base, then one each */
    u32 guest_intid_base;
    u32 intid_count;
    u32 reserved;
};

u32 board_linux;
static struct board_params board;

struct board_stage2 {
    u64 l1[512];
    u64 l2_low[512];
    u64 l3_gic[512];
    u64 l2_ram[512];
    u64 l3_trap[512];
};
static struct board_stage2 bs2 __attribute__((aligned(4096)));

/* Board mode? Reads and checks the board parameters (CPU0, before the others start). */
int board_linux_init(void)
{
    const volatile struct board_params *p = (const volatile struct board_params *)BOARD_PARAMS_ADDR;
    if (p->magic != BOARD_PARAMS_MAGIC)
        return 0;
    board.doorbell_intid = p->doorbell_intid;
    board.board_intid_base = p->board_intid_base;
    board.guest_intid_base = p->guest_intid_base;
    board.intid_count = p->intid_count;
    if (board.doorbell_intid < 32 || board.doorbell_intid >= 1020 ||
        board.board_intid_base < 32 || board.board_intid_base + board.intid_count > 1020 ||
        board.guest_intid_base < 32) {
        log_printf("board mode: bad board parameters (doorbell %u, SPIs %u+%u for INTIDs %u)",
                   board.doorbell_intid, board.board_intid_base, board.intid_count,
                   board.guest_intid_base);
        power_off();
    }
    board_linux = 1;
    log_printf("board mode: CPU0 runs the board Linux; trap doorbell INTID %u, board SPIs %u..%u "
               "-> guest INTIDs %u..", board.doorbell_intid, board.board_intid_base,
               board.board_intid_base + board.intid_count - 1, board.guest_intid_base);
    return 1;
}

static void map_ram_blocks(u64 base, u64 size)
{
    for (u64 a = base; a < base + size; a += 2ull << 20)
        bs2.l2_ram[(a >> 21) & 511] = a | S2_BLOCK | S2_AF | S2_RW | S2_SH_INNER | S2_NORMAL_WB;
}

static void board_stage2_init(const struct boot_params *linux_params, u64 trap_page)
{
    bs2.l1[0] = (u64)bs2.l2_low | S2_TABLE;
    bs2.l1[1] = (u64)bs2.l2_ram | S2_TABLE;
    bs2.l2_low[GICD_BASE >> 21] = (u64)bs2.l3_gic | S2_TABLE;
    for (u64 a = GICD_BASE; a < GICC_BASE + GIC_WINDOW_SIZE; a += 4096)
        bs2.l3_gic[(a >> 12) & 511] = a | S2_PAGE | S2_AF | S2_RW | S2_DEVICE | S2_XN;
    bs2.l2_low[VIRTIO_MMIO_BASE >> 21] = VIRTIO_MMIO_BASE | S2_BLOCK | S2_AF | S2_RW | S2_DEVICE |
                                         S2_XN;
    map_ram_blocks(linux_params->ram_phys, linux_params->ram_size);
    for (u32 vm = 1; vm < stub_vm_count; vm++) {
        const struct boot_params *p =
            (const struct boot_params *)(BOOT_PARAMS_ADDR + BOOT_PARAMS_STRIDE * vm);
        map_ram_blocks(p->ram_phys, p->ram_size);
    }
    bs2.l2_ram[(trap_page >> 21) & 511] = (u64)bs2.l3_trap | S2_TABLE;
    for (u64 a = trap_page; a < trap_page + TRAP_REGION_SIZE; a += 4096)
        bs2.l3_trap[(a >> 12) & 511] = a | S2_PAGE | S2_AF | S2_RW | S2_SH_INNER | S2_NORMAL_WB |
                                       S2_XN;
    write_sysreg(vtcr_el2, (1ull << 31) | (1ull << 16) | (1ull << 6) | 32);
    write_sysreg(vttbr_el2, (1ull << 48) | (u64)bs2.l1);
    dsb_ish();
    __asm__ volatile("tlbi vmalls12e1is" ::: "memory");
    dsb_ish();
    isb();
}

/* CPU0: enter the board Linux (never returns). */
void board_enter_linux(const struct boot_params *linux_params)
{
    if (linux_params->ram_phys != linux_params->ram_base) {
        log_printf("board mode: the board Linux's RAM must be mapped identity");
        power_off();
    }
    u64 trap = linux_params->trap_page;
    if ((trap & 0xfff) || trap >> 21 != (trap + TRAP_REGION_SIZE - 1) >> 21) {
        log_printf("board mode: the trap region 0x%lx+0x%x must be page aligned within one "
                   "2 MiB block", trap, TRAP_REGION_SIZE);
        power_off();
    }
    board_stage2_init(linux_params, trap);
    write_sysreg(hcr_el2, HCR_VM | HCR_SWIO | HCR_RW);
    write_sysreg(cptr_el2, 0x33ff);
    write_sysreg(hstr_el2, 0);
    write_sysreg(cnthctl_el2, 3);
    write_sysreg(cntvoff_el2, 0);
    write_sysreg(vpidr_el2, read_sysreg(midr_el1));
    write_sysreg(vmpidr_el2, read_sysreg(mpidr_el1));
    write_sysreg(sctlr_el1, 0x30d00800);
    isb();
    log_printf("entering the board Linux at 0x%lx, dtb 0x%lx", linux_params->kernel_entry,
               linux_params->dtb);
    enter_guest(linux_params->kernel_entry, linux_params->dtb);
}

/* The trap doorbell: pend the trap SPI (edge) in the distributor. */
void board_ring_doorbell(void)
{
    dsb_ish();   /* the posted slot is visible before the interrupt */
    mmio_write32(GICD_BASE + GICD_ISPENDR + 4 * (board.doorbell_intid / 32),
                 1u << (board.doorbell_intid % 32));
}

/* A physical IRQ taken at EL2 on a guest CPU: a board SPI becomes its guest INTID.
 * Returns 0 if ``intid`` is not one of this CPU's VM's board SPIs. */
int board_irq(u32 intid)
{
    const struct boot_params *p =
        (const struct boot_params *)(BOOT_PARAMS_ADDR + BOOT_PARAMS_STRIDE * cpu_index());
    if (!board_linux || intid < board.board_intid_base ||
        intid - board.board_intid_base >= board.intid_count)
        return 0;
    u32 guest = board.guest_intid_base + (intid - board.board_intid_base);
    if (guest < p->irq_base || guest - p->irq_base >= p->irq_count)
        return 0;
    vgic_request(guest / 32, 1u << (guest % 32));
    return 1;
}
