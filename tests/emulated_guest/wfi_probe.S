/*
 * wfi_probe.S - a bare-metal EL1 "guest" whose interrupt only the stub's WFI poll can
 * deliver (boards/emulated/idle.c). No timer, no doorbell from the host, no exit between
 * the request and the WFI: after each "ready" write it notes in RAM that it runs again
 * (word 0 = the round), spins until the host has set INTID 48's virq_pending bit without
 * ringing the stub and said so (word 4 = the round), then waits in WFI until INTID 48
 * comes (tests/test_emulated_stub.py). With a mode of 1 (read at window offset 0x304) it
 * goes to WFI at once, and the host requests while the stub polls or sleeps; with 2 it
 * says "ready" with a QueueNotify (posted: the guest resumes at once) and goes to WFI.
 * With 3 it only posts its QueueNotifies back to back, no interrupt, and after each one
 * stores its virtual counter (CNTVCT_EL0) at FLAGS + 16 + 8 * i, CNTFRQ_EL0 at FLAGS + 8:
 * the paced waits in the guest's own time.
 */
#include "gic_on.h"
#define FLAGS 0x41000000            /* two words of guest RAM the host reads and writes */
    .text
    .global _start
_start:
    ldr     x20, =0x0a000000        /* the virtio window */
    ldr     x22, =0x08000000        /* guest distributor (emulated by the stub) */
    ldr     x23, =0x08010000        /* guest CPU interface (GICV) */
    ldr     x25, =FLAGS
    adr     x9, vectors
    msr     vbar_el1, x9
    isb
    gic_on                          /* gic_on.h (w9 = 1) */
    ldr     w24, [x20, #0x300]      /* rounds, from the model */
    ldr     w26, [x20, #0x304]      /* mode, from the model */
    cmp     w26, #3
    b.eq    8f
1:  cbz     w24, 3f
    mov     x21, #0
    cmp     w26, #2
    b.eq    7f
    str     w24, [x20, #0x200]      /* "ready" */
    str     w24, [x25]              /* back in the guest */
    cbnz    w26, 5f                 /* mode 1: no wait for the request */
2:  ldr     w9, [x25, #4]           /* until the host requested INTID 48 */
    cmp     w9, w24
    b.ne    2b
5:  wait_irq48                      /* gic_on.h */
    sub     w24, w24, #1
    b       1b
3:  ldr     x0, =0x84000008         /* PSCI SYSTEM_OFF */
    smc     #0
6:  b       6b
7:  str     w24, [x20, #0x050]      /* mode 2: "ready" as a QueueNotify, a posted write */
    b       5b                      /* at once to WFI, the write still in the model's hands */
8:  mrs     x9, cntfrq_el0          /* mode 3: the counter after each posted write */
    str     x9, [x25, #8]
    add     x10, x25, #16
9:  cbz     w24, 3b
    str     w24, [x20, #0x050]
    isb
    mrs     x9, cntvct_el0
    str     x9, [x10], #8
    sub     w24, w24, #1
    b       9b

    irq48_vectors                   /* gic_on.h */
