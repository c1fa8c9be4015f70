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
 * The doorbell byte still comes and finds nothing left to do: delivery never depends on
 * the poll.
 *
 * When the window ends with nothing, the guest sleeps in a real WFI of its own: TWI is
 * cleared and the guest resumes *at* its WFI, which then halts it with the architecture's
 * exact wake-up conditions (its virtual interrupts, GICV priority mask and all). The
 * exception that wakes it (an IRQ: the doorbell, a timer, a kick) sets TWI again.
 *
 * The window adapts, as Linux KVM's halt_poll_ns: a wake-up that came within
 * GROW_LIMIT_US of the WFI grows it (x2, from POLL_START_US, at most POLL_MAX_US): a
 * poll that long might have seen it; a longer sleep (an idle guest's timer tick) resets
 * it to 0. So an idle guest pays one trap per WFI and no polling, and a busy one spins
 * at most POLL_MAX_US of each wait. Under TCG the spin costs a host core for that long.
 *
 * Board mode (a Pi, or board_linux here) has no virq_pending: the daemon raises the
 * guests' SPIs in the distributor, which wakes the WFI directly; WFI is not trapped there.
 */
#include "stub.h"

#define HCR_TWI        (1ull << 13)
#define POLL_START_US  10u
#define POLL_MAX_US    50u
#define GROW_LIMIT_US  250u

struct idle {
    u64 window;         /* ticks to poll at the next trapped WFI */
    u64 halted_at;      /* the counter at the WFI the guest now sleeps in (TWI clear), or 0 */
};

static struct idle idles[MAX_VMS];

static u64 us_ticks(u32 us) { return read_sysreg(cntfrq_el0) / 1000000 * us; }

static void set_twi(int on)
{
    u64 hcr = read_sysreg(hcr_el2);
    write_sysreg(hcr_el2, on ? hcr | HCR_TWI : hcr & ~HCR_TWI);
    isb();
}

/* On each guest CPU, after el2_init: trap its WFIs where the host raises interrupts
 * through virq_pending. */
void idle_init(void)
{
    idles[cpu_index()].window = us_ticks(POLL_START_US);
    if (!board_linux)
        set_twi(1);
}

/* Poll until a request for this VM or a physical IRQ shows, or ``window`` ticks pass. */
static int poll(u64 start, u64 window)
{
    do {
        if (trap_virq_requested() || (read_sysreg(isr_el1) & (1u << 7)))
            return 1;
    } while (counter() - start < window);
    return 0;
}

/* The guest's trapped WFI (ELR_EL2 at it). */
void idle_wfi(void)
{
    struct idle *s = &idles[cpu_index()];
    u64 start = counter();
    if (poll(start, s->window)) {
        write_sysreg(elr_el2, read_sysreg(elr_el2) + 4);
        return;
    }
    s->halted_at = start;
    set_twi(0);                 /* the guest re-executes its WFI and sleeps */
}

/* Every exception from the guest, first: the end of a sleep in the guest's own WFI. */
void idle_woken(void)
{
    struct idle *s = &idles[cpu_index()];
    if (!s->halted_at)
        return;
    u64 slept = counter() - s->halted_at;
    s->halted_at = 0;
    if (slept > us_ticks(GROW_LIMIT_US)) {
        s->window = 0;
    } else {
        u64 grown = s->window ? s->window * 2 : us_ticks(POLL_START_US);
        s->window = grown < us_ticks(POLL_MAX_US) ? grown : us_ticks(POLL_MAX_US);
    }
    set_twi(1);
}
