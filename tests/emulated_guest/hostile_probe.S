/*
 * hostile_probe.S - a bare-metal EL1 "guest" doing what the stub must answer without
 * harm to the board (tests/test_emulated_stub.py::test_a_hostile_guest_*): PSCI calls
 * for CPUs that are not its own, a fetch from its virtio window, AArch32 EL0 accesses to
 * the window (T32, 16- and 32-bit, in an IT block, without syndrome), a flood of faults
 * that each make a log line. It reports on its debug UART, "Rn <16 hex digits>" a line
 * (the stub logs them as "guest: ..."); no model is attached: window reads give 0.
 */
    .text
    .global _start

.macro putc c
    mov     w9, #\c
    str     w9, [x24]
.endm

/* "R<tag> <x0 in hex>\n" */
.macro report tag
    putc    'R'
    mov     w9, #(\tag / 10 + '0')
    str     w9, [x24]
    mov     w9, #(\tag % 10 + '0')
    str     w9, [x24]
    putc    ' '
    bl      puthex
    putc    '\n'
.endm

/* Run the T32 code at \code in AArch32 EL0 (r1 = the window, r2 = 0) until it takes an
 * exception to EL1: x28 = the vector offset taken, x27 = ESR_EL1, x29 = ELR_EL1,
 * x25 = FAR_EL1, x26 = its r2. */
.macro run_t32 code
    adr     x9, 1f
    adr     x10, cont
    str     x9, [x10]
    adr     x9, \code
    msr     elr_el1, x9
    mov     x9, #0x1f0              /* AArch32 User, T32, A/I/F masked */
    msr     spsr_el1, x9
    ldr     x1, =0x0a000000
    mov     x2, #0
    isb
    eret
1:
.endm

_start:
    ldr     x24, =0x09000000        /* the debug UART the stub emulates */
    adr     x9, vectors
    msr     vbar_el1, x9
    isb

    ldr     x0, =0x95c1ba5f         /* PSCI 0.1 CPU_OFF (QEMU's own ID) */
    smc     #0
    report  1
    ldr     x0, =0x95c1ba60         /* PSCI 0.1 CPU_ON: CPU 1 at _start */
    mov     x1, #1
    adr     x2, _start
    smc     #0
    report  2
    ldr     x0, =0x84000000         /* PSCI_VERSION: a query, answered by the firmware */
    smc     #0
    report  3
    ldr     x0, =0x84000004         /* AFFINITY_INFO of its own vCPU: ON */
    mov     x1, #0
    mov     x2, #0
    smc     #0
    report  4
    ldr     x0, =0xc4000004         /* of another: INVALID_PARAMETERS */
    mov     x1, #1
    mov     x2, #0
    smc     #0
    report  5

    adr     x9, fetched             /* an instruction fetch from the virtio window */
    adr     x10, cont
    str     x9, [x10]
    ldr     x9, =0x0a000000
    br      x9
fetched:
    mov     x0, x27
    report  6
    mov     x0, x29
    report  7
    mov     x0, x25
    report  8

    run_t32 t32_ldr
    mov     x0, x26
    report  9
    mov     x0, x28
    report  10
    run_t32 t32_it
    mov     x0, x26
    report  11
    run_t32 t32_ldrd
    mov     x0, x28
    report  12
    mov     x0, x27
    report  13
    run_t32 t32_ldm
    mov     x0, x27
    report  14

    ldr     x20, =0x0a000000        /* 5000 accesses with no syndrome, each a fault */
    mov     x21, #5000
2:  ldp     x7, x8, [x20]
    subs    x21, x21, #1
    b.ne    2b
    mrs     x10, cntfrq_el0         /* 0.2 s later, one more line is let through */
    lsr     x10, x10, #2
    mrs     x11, cntpct_el0
    add     x10, x10, x11
3:  mrs     x11, cntpct_el0
    cmp     x11, x10
    b.lo    3b
    mov     x0, #5000
    report  15
    ldr     x0, =0x84000008         /* PSCI SYSTEM_OFF */
    smc     #0
4:  b       4b

/* x0 -> 16 hex digits */
puthex:
    mov     x11, #60
5:  lsr     x12, x0, x11
    and     x12, x12, #0xf
    cmp     x12, #10
    b.lo    6f
    add     x12, x12, #('a' - 10)
    b       7f
6:  add     x12, x12, #'0'
7:  str     w12, [x24]
    subs    x11, x11, #4
    b.pl    5b
    ret

    .balign 8
cont: .quad 0                       /* where the next exception continues, 0: skip it */

    .balign 4
t32_ldr:                            /* ldr r0, [r1]; adds r2, #1 (twice); svc 0 */
    .hword 0x6808, 0x3201, 0x3201, 0xdf00, 0xe7fe
    .balign 4
t32_it:                             /* movs r3, #0; ite eq; ldreq r0, [r1]; addne r2, #1 */
    .hword 0x2300, 0xbf0c, 0x6808, 0x3201, 0xdf00, 0xe7fe
    .balign 4
t32_ldrd:                           /* ldrd r0, r3, [r1]: 32 bits, no syndrome */
    .hword 0xe9d1, 0x0300, 0xdf00, 0xe7fe
    .balign 4
t32_ldm:                            /* ldmia r1!, {r0}: 16 bits, no syndrome (IL 1) */
    .hword 0xc901, 0xdf00, 0xe7fe

    .balign 2048
vectors:
    b       .
    . = vectors + 0x200             /* from EL1: record, then continue or skip */
    mov     x28, #0x200
    b       taken
    . = vectors + 0x400
    mov     x28, #0x400
    b       taken
    . = vectors + 0x600
    mov     x28, #0x600
taken:
    mrs     x27, esr_el1
    mrs     x29, elr_el1
    mrs     x25, far_el1
    and     x26, x2, #0xffffffff
    adr     x10, cont
    ldr     x9, [x10]
    cbz     x9, 8f
    str     xzr, [x10]
    mov     x10, #0x3c5                 /* continue there at EL1h */
    msr     spsr_el1, x10
    msr     elr_el1, x9
    eret
8:  mrs     x9, elr_el1
    add     x9, x9, #4
    msr     elr_el1, x9
    eret
    . = vectors + 0x800
