/*
 * trap.c - the stub side of the trap page (docs/trap-abi.md).
 *
 * One vCPU per VM and one VM per CPU, so slot i is CPU i's (vcpu_id = slot
 * index, vm_id = the VM). A trapped access is posted (fields, then state =
 * POSTED with STLR, DMB, doorbell byte if the model sleeps), then the stub
 * spins with LDAR until DONE. Policies:
 *   - no model attached (model_state != ATTACHED), or the model detaches
 *     while the slot is posted: the access completes UNHANDLED;
 *   - UNHANDLED reads as zero, writes are ignored (the caller applies it).
 * virq_pending (AVT_F_VIRQ_REQUEST): each CPU takes only its own VM's INTIDs
 * (irq_base .. irq_base + irq_count - 1) with an atomic AND on every exception
 * it handles. The host's doorbell interrupts CPU0 only (the UART's SPI), so
 * CPU0 sends KICK_SGI to a CPU whose VM has requests waiting.
 */
#include "stub.h"

static volatile struct avt_header *hdr;

struct vm_trap {
    volatile struct avt_slot *slot;
    u16 vm_id;
    u32 irq_base, irq_count;
    int detached_logged;
};

static struct vm_trap vm_traps[MAX_VMS];

void trap_init(const struct boot_params *bp)
{
    hdr = (volatile struct avt_header *)bp->trap_page;
    store_release32(&hdr->stub_state, AVT_STUB_NOT_READY);
    for (u32 i = 0; i < AVT_PAGE_SIZE / 8; i++)
        ((volatile u64 *)hdr)[i] = 0;
    hdr->magic = AVT_MAGIC;
    hdr->abi_major = AVT_ABI_MAJOR;
    hdr->abi_minor = AVT_ABI_MINOR;
    hdr->slot_count = bp->vm_count;
    hdr->slot_size = AVT_SLOT_SIZE;
    hdr->slots_offset = AVT_SLOTS_OFFSET;
    hdr->stub_features = board_linux ? 0 : AVT_F_VIRQ_REQUEST;   /* board mode: board SPIs */
    hdr->counter_hz = read_sysreg(cntfrq_el0);
    store_release32(&hdr->stub_state, AVT_STUB_READY);
    log_printf("trap page at 0x%lx ready (%u slots, features 0x%x)", bp->trap_page,
               bp->vm_count, hdr->stub_features);
}

/* VM ``vm``'s slot (its CPU's) and INTIDs; by CPU0 for every VM, after trap_init. */
void trap_init_vm(u32 vm, const struct boot_params *bp)
{
    struct vm_trap *t = &vm_traps[vm];
    t->slot = (volatile struct avt_slot *)(bp->trap_page + AVT_SLOTS_OFFSET + AVT_SLOT_SIZE * vm);
    t->vm_id = (u16)bp->vm_id;
    t->irq_base = bp->irq_base;
    t->irq_count = bp->irq_count;
}

static int model_attached(void)
{
    return load_acquire32(&hdr->model_state) == AVT_MODEL_ATTACHED;
}

int trap_wait_model(u32 ms)
{
    u64 deadline = counter() + read_sysreg(cntfrq_el0) / 1000 * ms;
    while (!model_attached()) {
        if (counter() >= deadline)
            return 0;
    }
    return 1;
}

u32 trap_mmio(u64 gpa, u32 size, int is_write, u64 *value)
{
    struct vm_trap *t = &vm_traps[cpu_index()];
    volatile struct avt_slot *slot = t->slot;
    if (!model_attached()) {
        if (!t->detached_logged)
            log_printf("no device model attached: access to 0x%lx reads as zero / is ignored", gpa);
        t->detached_logged = 1;
        return AVT_STATUS_UNHANDLED;
    }
    t->detached_logged = 0;
    slot->seq = slot->seq + 1;
    slot->gpa = gpa;
    slot->data = is_write ? *value : 0;
    slot->size = (u8)size;
    slot->direction = is_write ? AVT_DIR_WRITE : AVT_DIR_READ;
    slot->status = AVT_STATUS_OK;
    slot->flags = 0;
    slot->vm_id = t->vm_id;
    slot->vcpu_id = (u16)cpu_index();
    slot->t_post = counter();
    store_release32(&slot->state, AVT_SLOT_POSTED);
    dmb_ish();
    if (hdr->model_sleeping)
        doorbell_ring_host();
    while (load_acquire32(&slot->state) != AVT_SLOT_DONE) {
        if (!model_attached()) {
            log_printf("device model detached during the access to 0x%lx", gpa);
            store_release32(&slot->state, AVT_SLOT_FREE);
            return AVT_STATUS_UNHANDLED;
        }
    }
    slot->t_done = counter();
    u32 status = slot->status;
    if (!is_write)
        *value = slot->data;
    store_release32(&slot->state, AVT_SLOT_FREE);
    return status;
}

/* The virq_pending bits of word w that belong to VM v. */
static u32 vm_mask(const struct vm_trap *t, u32 w)
{
    u32 mask = 0;
    for (u32 i = t->irq_base; i < t->irq_base + t->irq_count; i++)
        if (i / 32 == w)
            mask |= 1u << (i % 32);
    return mask;
}

void trap_take_virq_requests(void)
{
    const struct vm_trap *t = &vm_traps[cpu_index()];
    for (u32 w = t->irq_base / 32; w <= (t->irq_base + t->irq_count - 1) / 32; w++) {
        u32 mask = vm_mask(t, w);
        if (hdr->virq_pending[w] & mask)
            vgic_request(w, take_bits32(&hdr->virq_pending[w], mask));
    }
}

void trap_kick_other_vms(void)
{
    for (u32 cpu = 0; cpu < stub_vm_count; cpu++) {
        const struct vm_trap *t = &vm_traps[cpu];
        if (cpu == cpu_index() || !t->irq_count)
            continue;
        for (u32 w = t->irq_base / 32; w <= (t->irq_base + t->irq_count - 1) / 32; w++) {
            if (hdr->virq_pending[w] & vm_mask(t, w)) {
                vgic_kick(cpu);
                break;
            }
        }
    }
}
