/*
 * trap.c - the stub side of the trap page (docs/trap-abi.md).
 *
 * One vCPU per VM and one VM per CPU, so slot i is CPU i's (vcpu_id = slot
 * index, vm_id = the VM). A trapped access is posted (fields, then state =
 * POSTED with STLR, DMB, doorbell byte if the model sleeps), then the stub
 * waits with LDAR until DONE (wait_slot: it spins, then sleeps in WFI).
 * Posted writes (AVT_F_POSTED_WRITES, when the model accepted it):
 * QueueNotify and InterruptACK are posted with AVT_SLOT_F_POSTED_WRITE and
 * the guest resumes at once; the model frees the slot, and the vCPU's next access waits for that FREE before it is posted,
 * so the model serves the vCPU's accesses in program order. Policies:
 *   - no model attached (model_state != ATTACHED), or the model detaches
 *     with the slot still posted (state loaded again after DETACHED: an answer
 *     its final scan gave is taken): the access completes UNHANDLED;
 *   - UNHANDLED reads as zero, writes are ignored (the caller applies it).
 * Register shadows (AVT_F_REGISTER_SHADOW): a read of a register the model
 * keeps in the window's shadow page is answered here, with no round trip,
 * once the vCPU's posted write is served (the seqlock of avatar_trap.h).
 * InterruptACK (AVT_F_STUB_ACK, with the shadows): taken here too, once the slot is FREE,
 * as counts per InterruptStatus bit in the shadow page (take_ack); a shadowed
 * InterruptStatus read clears the bits acknowledged since the model wrote the page.
 * virq_pending (AVT_F_VIRQ_REQUEST): each CPU takes only its own VM's INTIDs
 * (irq_base .. irq_base + irq_count - 1) with an atomic AND on every exception
 * it handles. The host's doorbell interrupts CPU0 only (the UART's SPI), so
 * CPU0 sends KICK_SGI to a CPU whose VM has requests waiting. virq_polling
 * (AVT_F_HALT_POLL): each CPU sets its VM's bits while it polls in the guest's WFI
 * (idle.c), with the same atomics.
 */
#include "stub.h"

static volatile struct avt_header *hdr;

struct vm_trap {
    volatile struct avt_slot *slot;
    u16 vm_id;
    u32 irq_base, irq_count;
    int detached_logged;
    u64 window_base;        /* the VM's first device window (guest-physical) */
    u32 first_window;       /* its window number in the layout: its shadow page */
};

static struct vm_trap vm_traps[MAX_VMS];
static volatile struct avt_shadow *shadows;

/* The registers whose writes are posted (offsets in a 4 KiB device window). */
#define REG_QUEUE_NOTIFY   0x050u
#define REG_INTERRUPT_STATUS 0x060u
#define REG_INTERRUPT_ACK  0x064u
#define ACK_BITS           2u        /* InterruptStatus: used buffer, configuration change */
#define DEVICE_WINDOW_MASK 0xfffu

void trap_init(const struct boot_params *bp)
{
    hdr = (volatile struct avt_header *)bp->trap_page;
    store_release32(&hdr->stub_state, AVT_STUB_NOT_READY);
    for (u32 i = 0; i < AVT_PAGE_SIZE / 8; i++)
        ((volatile u64 *)hdr)[i] = 0;
    shadows = (volatile struct avt_shadow *)(bp->trap_page + SHADOW_OFFSET);
    for (u64 i = 0; i < SHADOW_COUNT * AVT_SHADOW_PAGE_SIZE / 8; i++)
        ((volatile u64 *)shadows)[i] = 0;
    hdr->shadow_offset = SHADOW_OFFSET;
    hdr->shadow_count = SHADOW_COUNT;
    hdr->magic = AVT_MAGIC;
    hdr->abi_major = AVT_ABI_MAJOR;
    hdr->abi_minor = AVT_ABI_MINOR;
    hdr->slot_count = bp->vm_count;
    hdr->slot_size = AVT_SLOT_SIZE;
    hdr->slots_offset = AVT_SLOTS_OFFSET;
    /* Board mode's model raises board SPIs through the distributor: no virq_pending. */
    hdr->stub_features = AVT_F_POSTED_WRITES | AVT_F_REGISTER_SHADOW | AVT_F_STUB_ACK |
                         AVT_F_PACE | (board_linux ? 0 : AVT_F_VIRQ_REQUEST | AVT_F_HALT_POLL |
                                                         AVT_F_RINGS_TAKEN);
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
    t->window_base = bp->window_base;
    t->first_window = (u32)(bp->vm_id * (bp->window_size / AVT_SHADOW_PAGE_SIZE));
}

static int model_attached(void)
{
    return load_acquire32(&hdr->model_state) == AVT_MODEL_ATTACHED;
}

/* Before the guest runs: sleep (cpu_sleep) in steps of MODEL_POLL_MS until the model attaches. */
#define MODEL_POLL_MS 5u

int trap_wait_model(u32 ms)
{
    u64 ticks_per_ms = read_sysreg(cntfrq_el0) / 1000;
    u64 deadline = counter() + ticks_per_ms * ms;
    while (!model_attached()) {
        if (counter() >= deadline)
            return 0;
        cpu_sleep(ticks_per_ms * MODEL_POLL_MS);
    }
    return 1;
}

/*
 * The vCPU's wait for the model's answer: spin for SPIN_US, then sleep (cpu_sleep) in steps
 * of an eighth of the time waited so far, at most SLEEP_MAX_US each. Answers come in
 * microseconds (busy-poll) to a few milliseconds (a model woken by its doorbell, board mode
 * under TCG); sleeping sooner made those later by the vCPU's wake-up (measured: a board-mode
 * guest's boot slower with a 200 us or 1 ms spin, docs/emulated-board.md "The stub's waits").
 * A wait past SPIN_US is a model descheduled, dead or restarting: the vCPU's host thread then
 * leaves the host's cores to it, and sees the answer at most about 1/8 late.
 */
#define SPIN_US      10000u    /* 10 ms */
#define SLEEP_MAX_US 1000u

/*
 * Wait until the slot's state is ``want``: 1, or 0 when the model detached first. Once
 * model_state reads DETACHED, state is loaded once more: the model's final scan may have
 * answered (DONE, or FREE for a posted write) after this vCPU's last load of state; it
 * stored that before its store-release of DETACHED, so after the load-acquire of DETACHED
 * this load sees it, and the answer is taken rather than written over (section 9).
 */
static int wait_slot(volatile struct avt_slot *slot, u32 want)
{
    if (load_acquire32(&slot->state) == want)
        return 1;
    u64 ticks_per_us = read_sysreg(cntfrq_el0) / 1000000;
    u64 start = counter();
    while (load_acquire32(&slot->state) != want) {
        if (!model_attached())
            return load_acquire32(&slot->state) == want;
        u64 waited = counter() - start;
        if (waited >= SPIN_US * ticks_per_us)
            cpu_sleep(waited / 8 < SLEEP_MAX_US * ticks_per_us ? waited / 8
                                                              : SLEEP_MAX_US * ticks_per_us);
    }
    return 1;
}

/*
 * Wait until the slot is FREE: it is POSTED only while the model has not yet
 * served this vCPU's last posted write. A model that detached with it still
 * POSTED (loaded after DETACHED) never will: withdraw it.
 */
static void wait_posted_write_served(volatile struct avt_slot *slot)
{
    if (!wait_slot(slot, AVT_SLOT_FREE))
        store_release32(&slot->state, AVT_SLOT_FREE);
}

static int postable(u64 gpa, int is_write)
{
    u64 reg = gpa & DEVICE_WINDOW_MASK;
    return is_write && (hdr->model_features & AVT_F_POSTED_WRITES) &&
           (reg == REG_QUEUE_NOTIFY || reg == REG_INTERRUPT_ACK);
}

/* The shadow page of the window ``gpa`` is in (and its offset there), or 0. */
static volatile struct avt_shadow *shadow_page(const struct vm_trap *t, u64 gpa, u32 *off)
{
    if (!(hdr->model_features & AVT_F_REGISTER_SHADOW))
        return 0;
    u64 rel = gpa - t->window_base;
    u32 window = t->first_window + (u32)(rel / AVT_SHADOW_PAGE_SIZE);
    *off = (u32)(rel % AVT_SHADOW_PAGE_SIZE);
    return window < SHADOW_COUNT ? &shadows[window] : 0;
}

static int word_valid(volatile struct avt_shadow *page, u32 off)
{
    u32 word = off / 4;
    return (page->valid[word / 32] >> (word % 32)) & 1;
}

/* A read answered from the window's shadow page: 1 (and *value), or 0: trap it. */
static int shadow_read(const struct vm_trap *t, u64 gpa, u32 size, u64 *value)
{
    u32 off;
    volatile struct avt_shadow *page = shadow_page(t, gpa, &off);
    if (!page || off >= AVT_SHADOW_IMAGE_SIZE || (off & (size - 1)))
        return 0;
    if (size != 4 && (off < 0x100 || size > 2))    /* registers: 32-bit reads only */
        return 0;
    u32 seq = load_acquire32(&page->seq);
    if ((seq & 1) || !word_valid(page, off))
        return 0;
    u64 v = size == 4 ? *(volatile u32 *)&page->image[off]
          : size == 2 ? *(volatile u16 *)&page->image[off] : page->image[off];
    if (off == REG_INTERRUPT_STATUS && (hdr->model_features & AVT_F_STUB_ACK)) {
        for (u32 bit = 0; bit < ACK_BITS; bit++)   /* acknowledged since the page was written */
            if (page->acks[bit] != page->acks_seen[bit])
                v &= ~(1ull << bit);
    }
    dmb_ishld();                  /* the value before the second read of seq */
    if (page->seq != seq)
        return 0;
    page->hits = page->hits + 1;
    *value = v;
    return 1;
}

/*
 * An InterruptACK write taken here (AVT_F_STUB_ACK): 1, or 0: post it. Only while the
 * model publishes the window (its InterruptStatus word valid): the model applies the
 * counts before it sets a bit; the DMB orders them before the guest's next loads (the
 * used ring), the other half of the handshake in docs/trap-abi.md section 15.
 */
static int take_ack(const struct vm_trap *t, u64 gpa, u32 size, u64 value)
{
    u32 off;
    volatile struct avt_shadow *page;
    if (!(hdr->model_features & AVT_F_STUB_ACK) || size != 4 ||
        (gpa & DEVICE_WINDOW_MASK) != REG_INTERRUPT_ACK)
        return 0;
    page = shadow_page(t, gpa, &off);
    if (!page || !word_valid(page, REG_INTERRUPT_STATUS))
        return 0;
    for (u32 bit = 0; bit < ACK_BITS; bit++)
        if (value & (1u << bit))
            increment_release32(&page->acks[bit]);
    dmb_ish();
    return 1;
}

/*
 * AVT_F_PACE: the wait the model asks of this vCPU before each access it posts or the
 * stub answers (a VM the model slows down, docs/trap-abi.md section 16). In cpu_sleep:
 * under TCG the vCPU's host thread sleeps, and on a board the core idles, rather than
 * spin through the accesses the model refuses. A physical IRQ that comes meanwhile (a
 * doorbell, a kick, the guest's timer: masked here at EL2, it ends the WFI) is handled
 * here as after any exit (vgic_handle_irq: what it brings is injected as the access
 * completes), and the wait goes on.
 */
static void pace(volatile struct avt_slot *slot)
{
    u32 us = slot->pace_us;                     /* plain load: a hint */
    if (!us || !(hdr->model_features & AVT_F_PACE))
        return;
    if (us > AVT_PACE_MAX_US)
        us = AVT_PACE_MAX_US;
    u64 end = counter() + us_ticks(us);
    for (u64 now = counter(); now < end; now = counter()) {
        cpu_sleep(end - now);
        if (read_sysreg(isr_el1) & ISR_EL1_I)
            vgic_handle_irq();
    }
}

u32 trap_mmio(u64 gpa, u32 size, int is_write, u64 *value)
{
    struct vm_trap *t = &vm_traps[cpu_index()];
    volatile struct avt_slot *slot = t->slot;
    pace(slot);
    wait_posted_write_served(slot);
    if (!model_attached()) {
        if (!t->detached_logged)
            log_printf("no device model attached: access to 0x%lx reads as zero / is ignored", gpa);
        t->detached_logged = 1;
        return AVT_STATUS_UNHANDLED;
    }
    t->detached_logged = 0;
    if (is_write ? take_ack(t, gpa, size, *value) : shadow_read(t, gpa, size, value))
        return AVT_STATUS_OK;
    int posted = postable(gpa, is_write);
    slot->seq = slot->seq + 1;
    slot->gpa = gpa;
    slot->data = is_write ? *value : 0;
    slot->size = (u8)size;
    slot->direction = is_write ? AVT_DIR_WRITE : AVT_DIR_READ;
    slot->status = AVT_STATUS_OK;
    slot->flags = posted ? AVT_SLOT_F_POSTED_WRITE : 0;
    slot->vm_id = t->vm_id;
    slot->vcpu_id = (u16)cpu_index();
    slot->t_post = counter();
    slot->t_done = 0;             /* section 4: 0 at post (the previous access's otherwise) */
    store_release32(&slot->state, AVT_SLOT_POSTED);
    dmb_ish();
    if (hdr->model_sleeping)
        doorbell_ring_host();
    if (posted)
        return AVT_STATUS_OK;        /* the model frees the slot (section 7) */
    if (!wait_slot(slot, AVT_SLOT_DONE)) {
        log_printf("device model detached during the access to 0x%lx", gpa);
        store_release32(&slot->state, AVT_SLOT_FREE);
        return AVT_STATUS_UNHANDLED;
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

/* Whether the model asked for any of this VM's INTIDs (plain loads: a hint, taken later). */
int trap_virq_requested(void)
{
    const struct vm_trap *t = &vm_traps[cpu_index()];
    for (u32 w = t->irq_base / 32; w <= (t->irq_base + t->irq_count - 1) / 32; w++)
        if (hdr->virq_pending[w] & vm_mask(t, w))
            return 1;
    return 0;
}

/* Whether the model is attached and scanning now (model_sleeping clear: busy-poll, or the
 * adaptive mode's window, or serving a doorbell): then it answers in microseconds, not
 * after a doorbell's trip (plain load: a hint). */
int trap_model_awake(void)
{
    return !hdr->model_sleeping && model_attached();
}

/* Whether the model holds this vCPU's posted write (its slot still POSTED: the guest
 * runs, so no other access is in flight). The model frees the slot after the write's
 * device work, and requests any interrupt that work raises before it frees it (release):
 * a caller that loads FREE here (acquire) then sees that request in virq_pending. */
int trap_posted_write_in_service(void)
{
    return load_acquire32(&vm_traps[cpu_index()].slot->state) == AVT_SLOT_POSTED;
}

/* This CPU's slot (its vCPU's): the stub's counters there. */
volatile struct avt_slot *trap_slot(void)
{
    return vm_traps[cpu_index()].slot;
}

/*
 * AVT_F_HALT_POLL: set (on) or clear this VM's virq_polling bits, then DMB ISH, which
 * orders the store before the caller's next loads of virq_pending (idle.c, the Dekker
 * pair with the model's OR, fence, read of virq_polling). Setting returns 0, and sets
 * nothing, when the model did not accept the feature: it rings for every request.
 */
int trap_publish_polling(int on)
{
    const struct vm_trap *t = &vm_traps[cpu_index()];
    if (on && !(hdr->model_features & AVT_F_HALT_POLL))
        return 0;
    for (u32 w = t->irq_base / 32; w <= (t->irq_base + t->irq_count - 1) / 32; w++) {
        if (on)
            set_bits32(&hdr->virq_polling[w], vm_mask(t, w));
        else
            take_bits32(&hdr->virq_polling[w], vm_mask(t, w));
    }
    dmb_ish();
    return 1;
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

/*
 * CPU0, rung (the UART's RX interrupt): empty the UART, then, with AVT_F_RINGS_TAKEN,
 * count the rings taken and DMB ISH before any look at virq_pending (the kick below, the
 * caller's take after it): a model that read the old count after its OR and DMB ISH
 * skipped its ring (its last one was not taken yet), and that look sees its bit. Only
 * CPU0 writes the count.
 */
static void kick_other_vms(void);

void trap_take_rings(void)
{
    int counted = (hdr->model_features & AVT_F_RINGS_TAKEN) != 0;
    uart_drain_rx(counted);
    if (counted) {
        store_release32(&hdr->rings_taken, hdr->rings_taken + 1);
        dmb_ish();
    }
    kick_other_vms();
}

static void kick_other_vms(void)
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
