/*
 * main.c - boot at EL2, stage-2 translation, and the guest's exceptions.
 *
 * One VM per CPU: CPU0 reads every VM's boot parameters, sets up the trap
 * page and the distributor, and starts CPU n (n >= 1) for VM n with PSCI
 * CPU_ON; each CPU then builds its own stage 2 (VTTBR_EL2.VMID = VM + 1),
 * sets up its banked GIC interfaces and enters its guest.
 *
 * Stage 2 (IPA 32 bits, 4 KiB granule, walks start at level 1):
 *   guest RAM            ram_base -> ram_phys, 2 MiB normal write-back blocks
 *   0x08010000 (GICC)    -> GICV 0x08040000, 4 KiB device pages
 *   everything else      unmapped: GICD (emulated, vgic.c), the virtio
 *                        window (trap page), the UART, the stub and the
 *                        trap page (outside guest RAM).
 * Guest exceptions handled: data aborts (virtio window, GICD, the guest's
 * debug UART - see log.c; any other address: a synchronous external abort
 * injected), instruction aborts (an external abort injected), SMC (PSCI,
 * HCR_EL2.TSC: the stub answers it for the guest's one vCPU - see handle_smc),
 * HVC (answers NOT_SUPPORTED), WFI (host mode, while the model is awake:
 * HCR_EL2.TWI, halt polling in idle.c), IRQs. Any other exception class from
 * the guest is logged and answered as the architecture answers an instruction
 * it does not have: UNDEFINED (EC 0) at the guest's EL1. Nothing a guest does
 * powers the board off but its own PSCI SYSTEM_OFF/RESET as the last VM.
 * A guest's instruction may be AArch32 (a 32-bit task at EL0): the PC moves on
 * by ESR_EL2.IL (2 or 4 bytes) and a T32 IT block's state advances with it.
 */
#include "stub.h"

#define EC_UNKNOWN 0x00
#define EC_WFX    0x01
#define EC_HVC64  0x16
#define EC_SMC64  0x17
#define EC_IABT_LOW 0x20
#define EC_DABT_LOW 0x24

#define ESR_IL  (1ull << 25)
#define ESR_ISV (1ull << 24)
#define ESR_SSE (1ull << 21)
#define ESR_SF  (1ull << 15)
#define ESR_WNR (1ull << 6)

#define SPSR_AA32 (1ull << 4)         /* M[4]: the guest ran in AArch32 (its EL0) */
#define FSC_EXTERNAL 0x10             /* DFSC/IFSC: synchronous external abort */

/* PSCI function IDs (DEN0022), SMC32 and SMC64 forms, and the SMCCC architecture calls. */
#define PSCI_VERSION      0x84000000u
#define PSCI_CPU_OFF      0x84000002u
#define PSCI_CPU_ON_32    0x84000003u
#define PSCI_CPU_ON_64    0xc4000003u
#define PSCI_AFFINITY_32  0x84000004u
#define PSCI_AFFINITY_64  0xc4000004u
#define PSCI_MIGRATE_INFO_TYPE 0x84000006u
#define PSCI_SYSTEM_OFF   0x84000008u
#define PSCI_SYSTEM_RESET 0x84000009u
#define PSCI_FEATURES     0x8400000au
#define SMCCC_ARCH_FIRST  0x80000000u /* SMCCC_VERSION, ARCH_FEATURES, ARCH_WORKAROUND_n */
#define SMCCC_ARCH_LAST   0x8000ffffu
#define PSCI_NOT_SUPPORTED ((u64)-1)
#define PSCI_INVALID_PARAMETERS ((u64)-2)
#define PSCI_ALREADY_ON   ((u64)-4)


struct stage2 {
    u64 l1[512];
    u64 l2_low[512];
    u64 l3_gic[512];
    u64 l2_ram[512];
};

static struct stage2 stage2s[MAX_VMS] __attribute__((aligned(4096)));
static volatile u32 vms_running;

static const struct boot_params *vm_params(u32 vm)
{
    return (const struct boot_params *)(BOOT_PARAMS_ADDR + BOOT_PARAMS_STRIDE * vm);
}

/* This CPU's VM's parameters. */
static const struct boot_params *my_params(void)
{
    return vm_params(cpu_index());
}

void power_off(void)
{
    log_printf("powering off");
    smc_call(PSCI_SYSTEM_OFF, 0, 0, 0);
    for (;;)
        __asm__ volatile("wfi");
}

static void stage2_init(void)
{
    const struct boot_params *params = my_params();
    struct stage2 *s2 = &stage2s[cpu_index()];
    u64 ram_end = params->ram_base + params->ram_size;
    if (params->ram_base < (1ull << 30) || ram_end > (2ull << 30) ||
        (params->ram_base | params->ram_size | params->ram_phys) & ((2ull << 20) - 1)) {
        log_printf("guest RAM 0x%lx+0x%lx at 0x%lx must be 2 MiB aligned within 1..2 GiB",
                   params->ram_base, params->ram_size, params->ram_phys);
        power_off();
    }
    s2->l1[0] = (u64)s2->l2_low | S2_TABLE;
    s2->l1[1] = (u64)s2->l2_ram | S2_TABLE;
    s2->l2_low[GICD_BASE >> 21] = (u64)s2->l3_gic | S2_TABLE;
    for (u64 off = 0; off < GIC_WINDOW_SIZE; off += 4096)
        s2->l3_gic[((GICC_BASE - GICD_BASE) + off) >> 12] =
            (GICV_BASE + off) | S2_PAGE | S2_AF | S2_RW | S2_DEVICE | S2_XN;
    for (u64 a = params->ram_base; a < ram_end; a += 2ull << 20)
        s2->l2_ram[(a >> 21) & 511] = (a - params->ram_base + params->ram_phys) |
            S2_BLOCK | S2_AF | S2_RW | S2_SH_INNER | S2_NORMAL_WB;
    /* Tables are written with the EL2 MMU off (non-cacheable): walks non-cacheable too. */
    u64 vtcr = (1ull << 31) | (1ull << 16) /* PS 36 bits */ | (1ull << 6) /* SL0: level 1 */ | 32;
    write_sysreg(vtcr_el2, vtcr);
    write_sysreg(vttbr_el2, ((u64)(cpu_index() + 1) << 48) | (u64)s2->l1);
    dsb_ish();
    __asm__ volatile("tlbi vmalls12e1is" ::: "memory");
    dsb_ish();
    isb();
}

static void el2_init(void)
{
    write_sysreg(hcr_el2, HCR_VM | HCR_SWIO | HCR_FMO | HCR_IMO | HCR_AMO | HCR_TSC | HCR_RW);
    write_sysreg(cptr_el2, 0x33ff);          /* RES1 bits; FP/SIMD not trapped */
    write_sysreg(hstr_el2, 0);
    write_sysreg(cnthctl_el2, 3);            /* EL1 may use the physical counter and timer */
    write_sysreg(cntvoff_el2, 0);
    write_sysreg(vpidr_el2, read_sysreg(midr_el1));
    write_sysreg(vmpidr_el2, read_sysreg(mpidr_el1) & ~0xffull);   /* the VM's vCPU 0 */
    write_sysreg(sctlr_el1, 0x30d00800);     /* RES1 bits, MMU and caches off */
    isb();
}

/* Where an exception from the guest state in ``spsr`` is taken at EL1 (Arm ARM D1.10.2,
 * "Exception vectors"): from AArch32 EL0, from AArch64 EL0, from EL1 with SP_EL0 or SP_EL1. */
static u64 el1_vector(u64 spsr)
{
    if (spsr & SPSR_AA32)
        return 0x600;
    u64 mode = spsr & 0xf;
    return mode == 0 ? 0x400 : mode == 4 ? 0x000 : 0x200;
}

/* Take an exception to the guest's EL1 as the hardware would have: class ``ec`` as seen
 * from a lower EL (the same-EL class is ec + 1 for aborts), ``iss``. IL is 1: it is for an
 * unknown reason, an instruction abort and a data abort without syndrome (ESR_ELx.IL). */
static void inject(u64 ec, u64 iss, u64 far)
{
    u64 spsr = read_sysreg(spsr_el2);
    if (ec != EC_UNKNOWN && !(spsr & SPSR_AA32) && (spsr & 0xf) != 0)
        ec += 1;                /* taken from EL1 itself: 0x21, 0x25 */
    write_sysreg(esr_el1, (ec << 26) | ESR_IL | iss);
    write_sysreg(far_el1, far);
    write_sysreg(elr_el1, read_sysreg(elr_el2));
    write_sysreg(spsr_el1, spsr);
    write_sysreg(elr_el2, read_sysreg(vbar_el1) + el1_vector(spsr));
    write_sysreg(spsr_el2, 0x3c5);          /* EL1h, DAIF masked */
}

static void inject_data_abort(u64 esr, u64 far)
{
    inject(EC_DABT_LOW, (esr & ESR_WNR) | FSC_EXTERNAL, far);
}

/* The next T32 instruction's IT state (Arm ARM, ITAdvance(); KVM's kvm_adjust_itstate). */
static u64 it_advance(u64 spsr)
{
    u64 it = ((spsr >> 25) & 3) | ((spsr >> 8) & 0xfc);
    if (!it)
        return spsr;
    it = (it & 7) == 0 ? 0 : (it & 0xe0) | ((it << 1) & 0x1f);
    return (spsr & ~((3ull << 25) | (0x3full << 10))) | ((it & 3) << 25) | ((it & 0xfc) << 8);
}

/* Resume the guest after the instruction the stub emulated: 2 or 4 bytes (ESR_EL2.IL). */
void skip_instruction(void)
{
    u64 spsr = read_sysreg(spsr_el2);
    write_sysreg(elr_el2, read_sysreg(elr_el2) + (read_sysreg(esr_el2) & ESR_IL ? 4 : 2));
    if (spsr & SPSR_AA32)
        write_sysreg(spsr_el2, it_advance(spsr));
}

static int in_range(u64 addr, u64 base, u64 size)
{
    return addr >= base && addr - base < size;
}

static void handle_data_abort(struct guest_regs *r, u64 esr)
{
    u64 far = read_sysreg(far_el2);
    u64 ipa = ((read_sysreg(hpfar_el2) >> 4) << 12) | (far & 0xfff);
    if (!(esr & ESR_ISV)) {
        if (guest_may_log())
            log_printf("guest access at pc 0x%lx to 0x%lx has no syndrome (ISV=0: pair, "
                       "writeback or SIMD access): external abort injected",
                       read_sysreg(elr_el2), ipa);
        inject_data_abort(esr, far);
        return;
    }
    u32 size = 1u << ((esr >> 22) & 3);
    u32 srt = (esr >> 16) & 31;
    int is_write = (esr & ESR_WNR) != 0;
    u64 mask = size == 8 ? ~0ull : (1ull << (8 * size)) - 1;
    u64 value = is_write && srt != 31 ? r->x[srt] & mask : 0;
    u32 status;
    const struct boot_params *params = my_params();
    if (in_range(ipa, params->window_base, params->window_size)) {
        status = trap_mmio(ipa, size, is_write, &value);
    } else if (in_range(ipa, GICD_BASE, GIC_WINDOW_SIZE) &&
               vgic_dist_access(ipa - GICD_BASE, size, is_write, &value)) {
        status = AVT_STATUS_OK;
    } else if (in_range(ipa, UART_BASE, 0x1000)) {
        guest_uart_access(ipa - UART_BASE, is_write, &value);
        status = AVT_STATUS_OK;
    } else {
        if (guest_may_log())
            log_printf("guest %u-byte %s at pc 0x%lx to unmapped 0x%lx: external abort "
                       "injected", size, is_write ? "write" : "read", read_sysreg(elr_el2), ipa);
        inject_data_abort(esr, far);
        return;
    }
    if (!is_write && srt != 31) {
        value = status == AVT_STATUS_OK ? value & mask : 0;
        if ((esr & ESR_SSE) && size < 8 && (value >> (8 * size - 1)) & 1)
            value |= ~mask;
        if (!(esr & ESR_SF))
            value &= 0xffffffffull;
        r->x[srt] = value;
    }
    skip_instruction();
}

/* The guest is done: the board powers off with the last running VM; until
 * then this CPU parks (vgic_park keeps CPU0 forwarding doorbells). */
static void vm_stop(void)
{
    u32 left;
    __asm__ volatile("1: ldaxr %w0, [%1]\n"
                     "   sub %w0, %w0, #1\n"
                     "   stlxr w9, %w0, [%1]\n"
                     "   cbnz w9, 1b" : "=&r"(left) : "r"(&vms_running) : "w9", "memory");
    if (left == 0)
        power_off();
    log_printf("guest powered off; %u VM(s) still running", left);
    vgic_park();
}

/* The guest's PSCI: it has one vCPU (MPIDR Aff0 = 0, VMPIDR_EL2) and no say over the
 * board's CPUs. Only queries go on to the firmware (QEMU's PSCI, at EL2: a CPU_ON it
 * honoured would start the guest's code at EL2); everything else is answered here, and
 * any other ID - PSCI 0.1's own IDs among them - is NOT_SUPPORTED. */
static void handle_smc(struct guest_regs *r)
{
    u32 fid = (u32)r->x[0];
    skip_instruction();                                 /* a trapped SMC returns to itself */
    if (fid == PSCI_SYSTEM_OFF || fid == PSCI_SYSTEM_RESET || fid == PSCI_CPU_OFF) {
        log_printf("guest: PSCI %s", fid == PSCI_SYSTEM_OFF ? "SYSTEM_OFF" :
                   fid == PSCI_SYSTEM_RESET ? "SYSTEM_RESET" : "CPU_OFF");
        if (stub_vm_count == 1 && fid != PSCI_CPU_OFF)
            r->x[0] = smc_call(fid, 0, 0, 0);       /* QEMU -no-reboot: ends */
        vm_stop();
    } else if (fid == PSCI_CPU_ON_32 || fid == PSCI_CPU_ON_64) {
        r->x[0] = (r->x[1] & 0xff00ffffffull) == 0 ? PSCI_ALREADY_ON : PSCI_INVALID_PARAMETERS;
    } else if (fid == PSCI_AFFINITY_32 || fid == PSCI_AFFINITY_64) {
        r->x[0] = (r->x[1] & 0xff00ffffffull) == 0 ? 0 /* ON */ : PSCI_INVALID_PARAMETERS;
    } else if (fid == PSCI_VERSION || fid == PSCI_MIGRATE_INFO_TYPE ||
               fid == PSCI_FEATURES || (fid >= SMCCC_ARCH_FIRST && fid <= SMCCC_ARCH_LAST)) {
        r->x[0] = smc_call(fid, r->x[1], r->x[2], r->x[3]);
    } else {
        r->x[0] = PSCI_NOT_SUPPORTED;
    }
}

static void before_guest_resumes(void)
{
    trap_take_virq_requests();
    vgic_flush();
    idle_resume();
}

void handle_sync(struct guest_regs *r)
{
    u64 esr = read_sysreg(esr_el2);
    idle_woken();
    switch (esr >> 26) {
    case EC_WFX:
        idle_wfi();             /* HCR_EL2.TWI (idle.c); WFE is not trapped */
        break;
    case EC_DABT_LOW:
        handle_data_abort(r, esr);
        break;
    case EC_SMC64:
        handle_smc(r);
        break;
    case EC_HVC64:
        r->x[0] = PSCI_NOT_SUPPORTED;
        break;
    case EC_IABT_LOW:           /* a fetch from an address stage 2 does not map */
        if (guest_may_log())
            log_printf("guest instruction fetch at 0x%lx (IPA 0x%lx) from unmapped memory: "
                       "external abort injected", read_sysreg(elr_el2),
                       (read_sysreg(hpfar_el2) >> 4) << 12 | (read_sysreg(far_el2) & 0xfff));
        inject(EC_IABT_LOW, FSC_EXTERNAL, read_sysreg(far_el2));
        break;
    default:
        if (guest_may_log())
            log_printf("unexpected exception from the guest: ESR 0x%lx ELR 0x%lx FAR 0x%lx "
                       "HPFAR 0x%lx: UNDEFINED injected", esr, read_sysreg(elr_el2),
                       read_sysreg(far_el2), read_sysreg(hpfar_el2));
        inject(EC_UNKNOWN, 0, 0);
    }
    before_guest_resumes();
}

void handle_irq(struct guest_regs *r)
{
    (void)r;
    idle_woken();
    vgic_handle_irq();
    before_guest_resumes();
}

void stub_fatal(void)
{
    log_printf("exception at EL2: ESR 0x%lx ELR 0x%lx FAR 0x%lx", read_sysreg(esr_el2),
               read_sysreg(elr_el2), read_sysreg(far_el2));
    power_off();
}

static int params_ok(u32 vm)
{
    const struct boot_params *p = vm_params(vm);
    if (p->magic != BOOT_PARAMS_MAGIC || p->version != BOOT_PARAMS_VERSION || p->vm_id != vm ||
        p->vm_count != vm_params(0)->vm_count) {
        log_printf("no boot parameters for VM %u at 0x%lx (magic 0x%x version %u)", vm,
                   (u64)p, p->magic, p->version);
        return 0;
    }
    if (p->irq_base < 32 || p->irq_count < 1 || p->irq_count > NR_GUEST_INTIDS ||
        p->irq_base + p->irq_count > NR_GUEST_INTIDS) {
        log_printf("VM %u: INTIDs %u+%u are not SPIs of the guests' distributor (32..%u)", vm,
                   p->irq_base, p->irq_count, NR_GUEST_INTIDS - 1);
        return 0;
    }
    return 1;
}

/* On every CPU: its stage 2, GIC interfaces and EL2 state, then its guest. */
static void enter_vm(void)
{
    const struct boot_params *params = my_params();
    stage2_init();
    vgic_init_cpu();
    el2_init();
    idle_init();
    if (params->model_wait_ms) {
        if (trap_wait_model(params->model_wait_ms))
            log_printf("device model attached");
        else
            log_printf("no device model after %u ms, booting without it", params->model_wait_ms);
    }
    log_printf("entering guest at 0x%lx, dtb 0x%lx", params->kernel_entry, params->dtb);
    enter_guest(params->kernel_entry, params->dtb);
}

void secondary_main(void)
{
    log_printf("CPU %u started at EL%u", cpu_index(), (u32)(read_sysreg(CurrentEL) >> 2));
    enter_vm();
}

void secondary_start(u64 cpu);

void stub_main(void)
{
    uart_init();
    log_printf("started at EL%u", (u32)(read_sysreg(CurrentEL) >> 2));
    if (!params_ok(0))
        power_off();
    u32 count = vm_params(0)->vm_count;
    if (count < 1 || count > MAX_VMS) {
        log_printf("%u VMs: this stub runs 1..%u (one per CPU)", count, MAX_VMS);
        power_off();
    }
    for (u32 vm = 1; vm < count; vm++)
        if (!params_ok(vm))
            power_off();
    stub_vm_count = count;
    vms_running = count;
    board_linux_init();
    trap_init(vm_params(0));
    for (u32 vm = 0; vm < count; vm++)
        trap_init_vm(vm, vm_params(vm));
    vgic_init_distributor();
    dsb_ish();
    for (u32 cpu = 1; cpu < count; cpu++) {
        u64 status = smc_call(PSCI_CPU_ON_64, cpu, (u64)secondary_start, cpu);
        if (status) {
            log_printf("PSCI CPU_ON for CPU %u failed (%ld): run QEMU with -smp %u",
                       cpu, (long long)status, count);
            power_off();
        }
    }
    if (board_linux)
        board_enter_linux(vm_params(0));
    enter_vm();
}
