/*
 * stub.h - shared definitions of the emulated board's EL2 stub.
 *
 * The stub is a minimal stand-in for Avatar's hypervisor on QEMU's virt
 * machine (GICv2, Cortex-A72, TCG): one guest (VM) per physical CPU, each
 * with its own stage 2 (VMID = VM + 1), trap-page slot and virtual GIC
 * state, the trap page, GICv2 virtualisation and PSCI forwarding. docs/emulated-board.md describes
 * the design. It runs with the EL2 MMU off: every stub access is a Device
 * access, so the code is built with -mstrict-align -mgeneral-regs-only.
 */
#ifndef STUB_H
#define STUB_H

#include "../abi/avatar_trap.h"

typedef avt_u8  u8;
typedef avt_u16 u16;
typedef avt_u32 u32;
typedef avt_u64 u64;

/* QEMU virt machine (virtualization=on, gic-version=2). */
#define GICD_BASE       0x08000000ull
#define GICC_BASE       0x08010000ull   /* physical CPU interface; the guest's GICC address */
#define GICH_BASE       0x08030000ull
#define GICV_BASE       0x08040000ull
#define GIC_WINDOW_SIZE 0x10000ull
#define UART_BASE       0x09000000ull
#define UART_INTID      33u             /* virt's PL011: SPI 1 */
#define MAINT_INTID     25u             /* GICH maintenance: PPI 9 */
#define KICK_SGI        1u              /* CPU0 -> another CPU: "look at virq_pending" */
#define HYP_TIMER_INTID 26u             /* EL2 physical timer (CNTHP): PPI 10, as on a Pi 4 */
#define MAX_VMS         4u              /* one per CPU; the stack and table arrays */
#define NR_GUEST_INTIDS 96u             /* INTIDs of each guest's emulated distributor */

/* Boot parameters written by the host (avatar_hw/emulated/memory_map.py): one
 * block per VM at BOOT_PARAMS_ADDR + BOOT_PARAMS_STRIDE * vm; VM n runs on CPU n. */
#define BOOT_PARAMS_MAGIC 0x50425641u   /* "AVBP" */
#define BOOT_PARAMS_VERSION 2u
#define BOOT_PARAMS_ADDR 0x5ffc0000ull   /* after the trap region (TRAP_REGION_SIZE) */
#define BOOT_PARAMS_STRIDE 0x100ull
struct boot_params {
    u32 magic;
    u32 version;
    u64 kernel_entry;     /* guest EL1 entry point (Linux Image start, guest-physical) */
    u64 dtb;              /* guest device tree (guest-physical) */
    u64 trap_page;        /* the trap page (outside every guest's RAM) */
    u64 ram_base;         /* guest RAM, guest-physical ... */
    u64 ram_size;
    u64 window_base;      /* this VM's virtio-mmio window, left unmapped */
    u64 window_size;
    u32 model_wait_ms;    /* wait this long for the model to attach before booting */
    u32 vm_id;
    u64 ram_phys;         /* ... and where stage 2 puts it (physical) */
    u32 vm_count;         /* VMs (= CPUs) on the board; the same in every block */
    u32 irq_base;         /* this VM's first device INTID */
    u32 irq_count;        /* and how many it owns (taken from virq_pending) */
    u32 reserved;
};

/* HCR_EL2 bits and stage-2 descriptor bits (main.c, board.c). */
#define HCR_VM   (1ull << 0)
#define HCR_SWIO (1ull << 1)
#define HCR_FMO  (1ull << 3)
#define HCR_IMO  (1ull << 4)
#define HCR_AMO  (1ull << 5)
#define HCR_TSC  (1ull << 19)
#define HCR_RW   (1ull << 31)
#define S2_TABLE      3ull
#define S2_BLOCK      1ull
#define S2_PAGE       3ull
#define S2_AF         (1ull << 10)
#define S2_RW         (3ull << 6)
#define S2_SH_INNER   (3ull << 8)
#define S2_NORMAL_WB  (0xfull << 2)
#define S2_DEVICE     (0x1ull << 2)
#define S2_XN         (1ull << 54)

struct guest_regs {
    u64 x[31];
    u64 pad;
};

#define read_sysreg(r) ({ u64 __v; __asm__ volatile("mrs %0, " #r : "=r"(__v)); __v; })
#define write_sysreg(r, v) __asm__ volatile("msr " #r ", %0" :: "r"((u64)(v)))
#define isb() __asm__ volatile("isb" ::: "memory")
#define dsb_ish() __asm__ volatile("dsb ish" ::: "memory")
#define dmb_ish() __asm__ volatile("dmb ish" ::: "memory")
#define dmb_ishld() __asm__ volatile("dmb ishld" ::: "memory")

/* Register shadow pages after the trap page (and a page left free), one per window of the
 * seed's layout (avatar_hw/emulated/memory_map.py SHADOW_OFFSET, SHADOW_COUNT): the trap
 * region, which board mode's board Linux maps whole (board.c). */
#define SHADOW_OFFSET 0x2000u
#define SHADOW_COUNT  128u
#define TRAP_REGION_SIZE (SHADOW_OFFSET + SHADOW_COUNT * AVT_SHADOW_PAGE_SIZE)

static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }

static inline u32 load_acquire32(volatile u32 *p)
{
    u32 v;
    __asm__ volatile("ldar %w0, [%1]" : "=r"(v) : "r"(p) : "memory");
    return v;
}

static inline void store_release32(volatile u32 *p, u32 v)
{
    __asm__ volatile("stlr %w0, [%1]" :: "r"(v), "r"(p) : "memory");
}

/* Atomically clear ``mask`` in *p; returns the bits of ``mask`` that were set. */
static inline u32 take_bits32(volatile u32 *p, u32 mask)
{
    u32 old, failed, left;
    __asm__ volatile("1: ldaxr %w0, [%3]\n"
                     "   bic %w2, %w0, %w4\n"
                     "   stlxr %w1, %w2, [%3]\n"
                     "   cbnz %w1, 1b"
                     : "=&r"(old), "=&r"(failed), "=&r"(left) : "r"(p), "r"(mask) : "memory");
    return old & mask;
}

/* Atomically set ``mask`` in *p. */
static inline void set_bits32(volatile u32 *p, u32 mask)
{
    u32 v, failed;
    __asm__ volatile("1: ldxr %w0, [%2]\n"
                     "   orr %w0, %w0, %w3\n"
                     "   stxr %w1, %w0, [%2]\n"
                     "   cbnz %w1, 1b"
                     : "=&r"(v), "=&r"(failed) : "r"(p), "r"(mask) : "memory");
}

/* Atomically add 1 to *p (exclusives: the Cortex-A72 has no LSE atomics), with release. */
static inline void increment_release32(volatile u32 *p)
{
    u32 v, failed;
    __asm__ volatile("1: ldxr %w0, [%2]\n"
                     "   add %w0, %w0, #1\n"
                     "   stlxr %w1, %w0, [%2]\n"
                     "   cbnz %w1, 1b"
                     : "=&r"(v), "=&r"(failed) : "r"(p) : "memory");
}

/* This CPU's index (MPIDR Aff0 on QEMU virt), kept in TPIDR_EL2 by start.S = its VM. */
static inline u32 cpu_index(void) { return (u32)read_sysreg(tpidr_el2); }

static inline u64 counter(void) { isb(); return read_sysreg(cntpct_el0); }
#define ISR_EL1_I (1u << 7)      /* a physical IRQ is pending (at EL2: to be taken here) */
/* Counter ticks in ``us`` microseconds: multiplied first, QEMU's virt counts at 62.5 MHz
 * (62 ticks a microsecond would make every wait 0.8 % short). */
static inline u64 us_ticks(u32 us) { return read_sysreg(cntfrq_el0) * us / 1000000; }

/* log.c: the stub's log and the stub->host doorbell share the PL011. */
void uart_init(void);
void uart_drain_rx(int flush);
void doorbell_ring_host(void);
void log_printf(const char *fmt, ...);
extern u32 stub_vm_count;   /* log lines carry "vmN: " when there is more than one */
void guest_uart_access(u64 offset, int is_write, u64 *value);
int guest_may_log(void);    /* a guest-made line may be logged now (rate-limited per VM) */

/* vgic.c */
void vgic_init_distributor(void);
void vgic_init_cpu(void);
void vgic_kick(u32 cpu);
void vgic_park(void) __attribute__((noreturn));
void cpu_sleep(u64 ticks);
void vgic_handle_irq(void);
void vgic_request(u32 word, u32 bits);
void vgic_flush(void);
int vgic_dist_access(u64 offset, u32 size, int is_write, u64 *value);

/* trap.c */
void trap_init(const struct boot_params *bp);
void trap_init_vm(u32 vm, const struct boot_params *bp);
int trap_wait_model(u32 ms);
void trap_take_rings(void);
u32 trap_mmio(u64 gpa, u32 size, int is_write, u64 *value);
void trap_take_virq_requests(void);
int trap_virq_requested(void);
volatile struct avt_slot *trap_slot(void);
int trap_model_awake(void);
int trap_posted_write_in_service(void);
int trap_publish_polling(int on);

/* idle.c */
void idle_init(void);
void idle_resume(void);
void idle_wfi(void);
void idle_woken(void);

/* board.c: board mode (CPU0 runs the board Linux) */
extern u32 board_linux;
int board_linux_init(void);
void board_enter_linux(const struct boot_params *linux_params) __attribute__((noreturn));
void board_ring_doorbell(void);
int board_irq(u32 intid);

/* start.S / main.c */
void skip_instruction(void);    /* ELR_EL2 past the trapped instruction (ESR_EL2.IL) */
void enter_guest(u64 entry, u64 dtb) __attribute__((noreturn));
u64 smc_call(u64 fid, u64 a1, u64 a2, u64 a3);
void power_off(void) __attribute__((noreturn));

#endif
