/*
 * log.c - the PL011, owned by the stub (the guest's console is virtio hvc0).
 *
 * TX carries two things the host separates byte by byte: log lines
 * ("avatar-stub: ...\n", printable ASCII only) and doorbell bytes (0x00, "a
 * trap was posted while the model sleeps"). RX carries the host's doorbell
 * ("look at virq_pending"): any byte, drained by the RX interrupt at EL2
 * (CPU0's), its FIFO (16 bytes) on. Every CPU logs: a spinlock keeps each line whole, and with more
 * than one VM a line names the VM of the CPU that wrote it ("vm1: ...").
 */
#include "stub.h"

#define UARTDR    0x000
#define UARTFR    0x018
#define UARTIBRD  0x024
#define UARTFBRD  0x028
#define UARTLCR_H 0x02c
#define UARTCR    0x030
#define UARTIMSC  0x038
#define UARTICR   0x044
#define FR_RXFE   (1u << 4)
#define FR_RXFF   (1u << 6)
#define LCR_FEN   (1u << 4)
#define LCR_8N1   (3u << 5)
#define FR_TXFF   (1u << 5)
#define IM_RX     (1u << 4)
#define IM_RT     (1u << 6)

void uart_init(void)
{
    mmio_write32(UART_BASE + UARTCR, 0);
    mmio_write32(UART_BASE + UARTIBRD, 13);
    mmio_write32(UART_BASE + UARTFBRD, 1);
    mmio_write32(UART_BASE + UARTLCR_H, LCR_8N1 | LCR_FEN);
    mmio_write32(UART_BASE + UARTICR, 0x7ff);
    mmio_write32(UART_BASE + UARTIMSC, IM_RX | IM_RT);
    mmio_write32(UART_BASE + UARTCR, (1u << 0) | (1u << 8) | (1u << 9));  /* UARTEN, TXE, RXE */
}

static void uart_putc(char c)
{
    while (mmio_read32(UART_BASE + UARTFR) & FR_TXFF)
        ;
    mmio_write32(UART_BASE + UARTDR, (u8)c);
}

/*
 * Clear the RX interrupt first, then empty the FIFO: a byte that arrives after
 * that raises the interrupt again (QEMU's PL011 raises it when its FIFO goes
 * from 0 to 1 byte). The other order lost the host's doorbell for good: a byte
 * landing between the emptying and the clear stayed in the FIFO with its
 * interrupt cleared, and no later byte interrupted again.
 *
 * The host's bytes say nothing but "look at virq_pending", so with ``flush``
 * (the model accepted AVT_F_RINGS_TAKEN) the FIFO is emptied by switching it
 * off and on (QEMU's PL011 resets its FIFO when LCR_H.FEN changes; this stub
 * runs on QEMU only) instead of read: QEMU's PL011 wakes its main loop on every UARTDR read
 * (qemu_chr_fe_accept_input), a host thread's wake-up per interrupt for
 * nothing. That needs the FIFO never to fill: a full one stops QEMU reading
 * the socket until a UARTDR read says there is room again, so a full FIFO is
 * still read once. The model keeps it nearly empty: it sends at most one byte
 * per count the stub publishes (trap_take_rings).
 */
void uart_drain_rx(int flush)
{
    mmio_write32(UART_BASE + UARTICR, IM_RX | IM_RT);
    if (flush) {
        u32 full = mmio_read32(UART_BASE + UARTFR) & FR_RXFF;
        mmio_write32(UART_BASE + UARTLCR_H, LCR_8N1);
        mmio_write32(UART_BASE + UARTLCR_H, LCR_8N1 | LCR_FEN);
        if (full)
            (void)mmio_read32(UART_BASE + UARTDR);
    } else {
        while (!(mmio_read32(UART_BASE + UARTFR) & FR_RXFE))
            (void)mmio_read32(UART_BASE + UARTDR);
    }
#ifdef STUB_TEST_DRAIN_WINDOW_US
    /* Tests only: hold the window after the FIFO was emptied open, so that the host's next
     * doorbell byte lands in it (tests/test_emulated_stub.py forces the race this way). */
    u64 end = counter() + us_ticks(STUB_TEST_DRAIN_WINDOW_US);
    while (counter() < end)
        ;
#endif
}

void doorbell_ring_host(void)
{
    if (board_linux) {
        board_ring_doorbell();
        return;
    }
    uart_putc(0);
}

static void put_text(char c)
{
    if (c != '\n' && (c < 0x20 || c > 0x7e))
        c = '?';           /* keep 0x00 for the doorbell */
    uart_putc(c);
}

static void put_str(const char *s)
{
    while (*s)
        put_text(*s++);
}

static void put_num(u64 v, unsigned base, int width)
{
    char buf[24];
    int n = 0;
    do {
        buf[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (n < width)
        buf[n++] = '0';
    while (n)
        put_text(buf[--n]);
}

u32 stub_vm_count = 1;
static volatile u32 log_lock;

static void lock_log(void)
{
    u32 busy, failed;
    do {
        __asm__ volatile("1: ldaxr %w0, [%2]\n"
                         "   cbnz %w0, 2f\n"
                         "   stxr %w1, %w3, [%2]\n"
                         "   b 3f\n"
                         "2: clrex\n"
                         "   mov %w1, #1\n"
                         "3:"
                         : "=&r"(busy), "=&r"(failed) : "r"(&log_lock), "r"(1u) : "memory");
    } while (failed);
}

static void unlock_log(void)
{
    store_release32(&log_lock, 0);
}

/* %s %c %u %d %x %lx %lu %ld and %0Nx / %0Nlx; each line gets the stub's prefix. */
void log_printf(const char *fmt, ...)
{
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    lock_log();
    put_str("avatar-stub: ");
    if (stub_vm_count > 1) {
        put_str("vm");
        put_num(cpu_index(), 10, 0);
        put_str(": ");
    }
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put_text(*fmt);
            continue;
        }
        fmt++;
        int width = 0, is_long = 0;
        if (*fmt == '0')
            fmt++;
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        if (*fmt == 'l') {
            is_long = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's': put_str(__builtin_va_arg(ap, const char *)); break;
        case 'c': put_text((char)__builtin_va_arg(ap, int)); break;
        case 'x': put_num(is_long ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 16, width); break;
        case 'u': put_num(is_long ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 10, width); break;
        case 'd': {
            long long v = is_long ? __builtin_va_arg(ap, long long) : __builtin_va_arg(ap, int);
            if (v < 0) {
                put_text('-');
                v = -v;
            }
            put_num((u64)v, 10, width);
            break;
        }
        default: put_text('%'); put_text(*fmt); break;
        }
    }
    put_text('\n');
    unlock_log();
    __builtin_va_end(ap);
}

/*
 * What a guest makes the stub log (its debug UART's lines, its faults) it can make as fast
 * as it runs, and the lines share the PL011 with the doorbells: each VM may log
 * GUEST_LOG_BURST lines at once and GUEST_LOG_PER_SECOND a second after that (a GCRA token
 * bucket; only the VM's own CPU touches its state). Lines past that are counted, and the
 * next one logged says how many were left out.
 */
#define GUEST_LOG_BURST 500
#define GUEST_LOG_PER_SECOND 50
static u64 guest_log_due[MAX_VMS];
static u32 guest_log_left_out[MAX_VMS];

int guest_may_log(void)
{
    u32 vm = cpu_index();
    u64 now = counter(), interval = read_sysreg(cntfrq_el0) / GUEST_LOG_PER_SECOND;
    u64 due = guest_log_due[vm] > now ? guest_log_due[vm] : now;
    if (due - now > (GUEST_LOG_BURST - 1) * interval) {
        guest_log_left_out[vm]++;
        return 0;
    }
    guest_log_due[vm] = due + interval;
    if (guest_log_left_out[vm]) {
        log_printf("%u guest-made log lines left out (at most %u a second)",
                   guest_log_left_out[vm], GUEST_LOG_PER_SECOND);
        guest_log_left_out[vm] = 0;
    }
    return 1;
}

/*
 * The guest's debug UART: the PL011 address is unmapped in stage 2, and the
 * stub emulates just enough of a PL011 (DR writes, FR reads "TX empty") for
 * Linux's earlycon (bootargs "earlycon=pl011,mmio32,0x09000000"). Its output
 * becomes "guest: ..." log lines. Reads of DR give nothing (no input).
 */
static char guest_lines[MAX_VMS][200];
static u32 guest_lens[MAX_VMS];

void guest_uart_access(u64 offset, int is_write, u64 *value)
{
    char *guest_line = guest_lines[cpu_index()];
    u32 *len = &guest_lens[cpu_index()];
    if (!is_write) {
        *value = offset == UARTFR ? (1u << 7) | FR_RXFE : 0;   /* TXFE, RX empty */
        return;
    }
    if (offset != UARTDR)
        return;
    char c = (char)*value;
    if (c == '\n' || *len == sizeof(guest_lines[0]) - 1) {
        guest_line[*len] = 0;
        if (guest_may_log())
            log_printf("guest: %s", guest_line);
        *len = 0;
    }
    if (c != '\n' && c != '\r')
        guest_line[(*len)++] = c;
}
