/*
 * idle.c - the guest's WFI, trapped (HCR_EL2.TWI): halt polling, host mode only.
 *
 * A guest waiting for its device's interrupt (QueueNotify posted, then the idle loop's
 * WFI) is woken by the host's doorbell byte: the daemon sets the INTID's virq_pending bit,
 * then writes a byte to the UART socket, which QEMU's main loop feeds to the PL011, whose
 * RX interrupt wakes this halted vCPU. The bit is in shared memory long before that
 * interrupt arrives. So a trapped WFI first polls, for a bounded window, this VM's
 * virq_pending bits and the physical interrupt status (ISR_EL1: at EL2 it shows physical
 * IRQs, which take the guest back to EL2 anyway); when either shows, the WFI completes
 * at once (a WFI may always complete early: Arm ARM D1 "Wait For Interrupt"), and
 * before_guest_resumes takes the bits (LDAXR: acquire, as on every exit) and injects them.
 *
 * While it polls, the stub says so in the trap page (AVT_F_HALT_POLL, when the model
 * accepted it): its VM's bits of virq_polling are set, and the model then sets a
 * virq_pending bit without ringing. Dekker, as model_sleeping (docs/trap-abi.md 8):
 *   stub:  virq_polling |= mine; DMB ISH; poll virq_pending ...
 *          virq_polling &= ~mine; DMB ISH; read virq_pending once more; then a real WFI
 *   model: virq_pending |= bit; DMB ISH; ring unless virq_polling has the bit
 * Each side stores, fences, then loads what the other stores, so at least one sees the
 * other's store: the model sees polling clear and rings, or the stub's look after it
 * cleared polling (or its poll) sees the request. A request is never left without either.
 * Otherwise delivery does not depend on the poll: whatever the poll misses is rung. A
 * poll that sees a request takes it (LDAXR/STLXR, then injects) *before* it clears
 * polling, and the model, reading polling clear, then reads virq_pending (acquire): its
 * bit gone means taken, no ring. Without that the model, slower than the stub's loop,
 * would nearly always read polling already cleared and ring for nothing.
 *
 * When the window ends with nothing, the guest sleeps in a real WFI of its own: TWI is
 * cleared and the guest resumes *at* its WFI, which then halts it with the architecture's
 * exact wake-up conditions (its virtual interrupts, GICV priority mask and all). The
 * exception that wakes it (an IRQ: the doorbell, a timer, a kick) sets TWI again, if the
 * model is awake: WFI is trapped only while the model was awake at the guest's last exit
 * (idle_resume), so with a model asleep on its doorbell the guest's WFI halts at once, as
 * without halt polling, with no trap.
 *
 * The stub polls only while the model is awake (model_sleeping clear: it busy-polls, is
 * in the adaptive mode's window, or serves a doorbell): a sleeping model answers only
 * after its own doorbell's trip through QEMU's main loop and the launcher, hundreds of
 * microseconds on a loaded host, which no bounded poll would see (polling for it ran
 * slower, the polls running out: docs/performance.md section 4). The window adapts, as
 * Linux KVM's halt_poll_ns, on those waits only: a wake-up that came within
 * GROW_LIMIT_US of the WFI grows it (x2, from POLL_START_US, at most POLL_MAX_US): a
 * poll that long might have seen it; a longer sleep (an idle guest's timer tick) resets it
 * to 0, and with a window of 0 nothing is published or polled. So an idle guest pays one
 * trap per WFI and no polling, and a busy one spins at most POLL_MAX_US of each wait.
 * Under TCG the spin costs a host core for that long.
 *
 * A WFI that follows a posted write the awake model still holds (QueueNotify: the guest
 * resumed at once and now waits for the device) is the case that window does not see: the
 * wait is the device's work, and a 1 MiB read is a millisecond. So while the slot stays
 * POSTED (trap_posted_write_in_service) the stub polls on, up to a serve window of its
 * own, and publishes polling all the while: the interrupt the write's device work raises
 * then needs no UART byte, no QEMU main loop, no PL011 interrupt. The model requests it
 * before it frees the slot (trap.c), so once the slot is FREE one more look decides. Only
 * with the model awake: asleep, its doorbell's trip comes first, and on a loaded host the
 * spin would take the core that trip needs (measured: bulk reads 2-3x slower with a serve
 * poll behind a sleeping model, docs/performance.md section 4); awake, it has a core (the
 * adaptive mode stops polling, and so sleeps, when it waits for one: avatar_hw/wait.py).
 * The serve window starts at SERVE_MAX_US and adapts as KVM's does, on the sleeps that
 * began with the write in service: woken within SERVE_MAX_US (x2, from SERVE_START_US), it
 * grows; a longer sleep halves it, to 0 below the start.
 *
 * Counters in the vCPU's slot (stub only, informational): wfi_caught (the poll, or the
 * last look, saw a request), wfi_ran_out (a window ran out), wfi_slept (no window).
 *
 * Board mode (a Pi, or board_linux here) has no virq_pending: the daemon raises the
 * guests' SPIs in the distributor, which wakes the WFI directly; WFI is not trapped there.
 */
#include "stub.h"

#define HCR_TWI        (1ull << 13)
#define POLL_START_US  10u
#define POLL_MAX_US    50u
#define GROW_LIMIT_US  250u
#define SERVE_START_US 50u
#define SERVE_MAX_US   2000u

struct idle {
    u64 window;         /* ticks to poll at the next trapped WFI */
    u64 serve;          /* ticks to poll on while a posted write is in service */
    u64 halted_at;      /* the counter at the WFI the guest now sleeps in (TWI clear), or 0 */
    int adapt;          /* that sleep began with the model awake: it adapts the window */
    int adapt_serve;    /* ... with a posted write in service: it adapts the serve window */
    int twi;            /* HCR_EL2.TWI as last set */
};

static struct idle idles[MAX_VMS];

static void set_twi(int on)
{
    u64 hcr = read_sysreg(hcr_el2);
    write_sysreg(hcr_el2, on ? hcr | HCR_TWI : hcr & ~HCR_TWI);
    isb();
}

/* On each guest CPU, after el2_init (TWI clear). */
void idle_init(void)
{
#ifdef STUB_TEST_HALT_POLL_US
    idles[cpu_index()].window = us_ticks(STUB_TEST_HALT_POLL_US);  /* tests: fixed window */
#else
    idles[cpu_index()].window = us_ticks(POLL_START_US);
#endif
#ifdef STUB_TEST_SERVE_POLL_US
    idles[cpu_index()].serve = us_ticks(STUB_TEST_SERVE_POLL_US);  /* tests: fixed window */
#else
    idles[cpu_index()].serve = us_ticks(SERVE_MAX_US);   /* shrinks if the model is slow */
#endif
}

/* Every exit, as the guest resumes: trap its WFIs where the host raises interrupts
 * through virq_pending, while the model is awake, unless it is to sleep in its WFI now. */
void idle_resume(void)
{
    struct idle *s = &idles[cpu_index()];
    int twi = !board_linux && !s->halted_at && trap_model_awake();
    if (twi != s->twi) {
        set_twi(twi);
        s->twi = twi;
    }
}

enum seen { NOTHING, REQUEST, IRQ };

/* Poll until a request for this VM or a physical IRQ shows, or ``window`` ticks pass, or,
 * while this vCPU's posted write is in service, ``serve`` ticks. */
static enum seen poll(u64 start, u64 window, u64 serve)
{
    for (;;) {
        int serving = serve && trap_posted_write_in_service();  /* acquire: before the look */
        if (trap_virq_requested())
            return REQUEST;
        if (read_sysreg(isr_el1) & ISR_EL1_I)
            return IRQ;
        u64 waited = counter() - start;
        if (waited >= window && (!serving || waited >= serve))
            return NOTHING;
    }
}

static void count(volatile u32 *counter) { *counter = *counter + 1; }

/* The guest's trapped WFI (ELR_EL2 at it). */
void idle_wfi(void)
{
    struct idle *s = &idles[cpu_index()];
    volatile struct avt_slot *slot = trap_slot();
    u64 start = counter();
    int awake = trap_model_awake();
    int in_service = awake && trap_posted_write_in_service();
    u64 window = awake ? s->window : 0;
    u64 serve = in_service ? s->serve : 0;
    int published = (window || serve) && trap_publish_polling(1);
    enum seen seen = poll(start, window, serve);
#ifdef STUB_TEST_HALT_POLL_HOLD_US
    /* Tests only: keep polling published, not looking, after the window ran out, so that
     * the host requests then without a ring and only the last look below can see it. */
    u64 hold = counter() + us_ticks(STUB_TEST_HALT_POLL_HOLD_US);
    while (published && seen == NOTHING && counter() < hold)
        ;
#endif
    if (published) {
        if (seen == REQUEST)            /* taken before polling is cleared: the model */
            trap_take_virq_requests();  /* then sees polling set or the bit gone */
        trap_publish_polling(0);        /* cleared, DMB ISH, then the last look: */
        if (seen == NOTHING && trap_virq_requested())
            seen = REQUEST;             /* the model saw polling set and did not ring */
    }
    if (seen != NOTHING) {
        if (seen == REQUEST)
            count(&slot->wfi_caught);
        skip_instruction();
        return;                         /* before_guest_resumes takes and injects it */
    }
    count(window || serve ? &slot->wfi_ran_out : &slot->wfi_slept);
#ifdef STUB_TEST_SLEEP_GAP_US
    /* Tests only: a request the model makes now, after the count, is taken as the guest
     * resumes at its WFI (before_guest_resumes), not by a poll or a look. */
    u64 gap = counter() + us_ticks(STUB_TEST_SLEEP_GAP_US);
    while (counter() < gap)
        ;
#endif
    s->halted_at = start;       /* idle_resume clears TWI: the guest re-executes its WFI */
    s->adapt = awake;           /* and sleeps */
    s->adapt_serve = in_service;
}

/* Every exception from the guest, first: the end of a sleep in the guest's own WFI. */
void idle_woken(void)
{
    struct idle *s = &idles[cpu_index()];
    if (!s->halted_at)
        return;
    u64 slept = counter() - s->halted_at;
    s->halted_at = 0;
#ifndef STUB_TEST_SERVE_POLL_US
    if (s->adapt_serve) {
        u64 grown = s->serve ? s->serve * 2 : us_ticks(SERVE_START_US);
        if (slept > us_ticks(SERVE_MAX_US))
            s->serve = s->serve / 2 < us_ticks(SERVE_START_US) ? 0 : s->serve / 2;
        else
            s->serve = grown < us_ticks(SERVE_MAX_US) ? grown : us_ticks(SERVE_MAX_US);
    }
#endif
#ifndef STUB_TEST_HALT_POLL_US      /* tests only: the window stays as set */
    if (!s->adapt) {
        /* the model slept: its answer came through its doorbell, which says nothing of
         * how soon an awake model answers */
    } else if (slept > us_ticks(GROW_LIMIT_US)) {
        s->window = 0;
    } else {
        u64 grown = s->window ? s->window * 2 : us_ticks(POLL_START_US);
        s->window = grown < us_ticks(POLL_MAX_US) ? grown : us_ticks(POLL_MAX_US);
    }
#else
    (void)slept;
#endif
}
