/*
 * probe.S - a bare-metal EL1 "guest" for the stub's trap-path test.
 * Runs with the MMU off; x20 = the virtio window. Every access below is
 * checked by tests/test_emulated_stub.py through the model it attaches.
 */
#include "gic_on.h"
    .text
    .global _start
_start:
    ldr     x20, =0x0a000000
    ldr     x22, =0x08000000        /* guest distributor (emulated by the stub) */
    ldr     x23, =0x08010000        /* guest CPU interface (GICV) */
    adr     x9, vectors
    msr     vbar_el1, x9
    isb

    ldr     w1, [x20]               /* 32-bit read, echoed */
    str     w1, [x20, #0x100]
    ldrsb   x2, [x20, #0x4]         /* byte read, sign-extended to 64 bits */
    str     x2, [x20, #0x108]
    ldrh    w3, [x20, #0x6]         /* halfword, zero-extended */
    str     x3, [x20, #0x110]
    ldr     x4, [x20, #0x8]         /* 64-bit read */
    str     x4, [x20, #0x118]
    ldrsh   w5, [x20, #0x12]        /* sign-extended to 32 bits: upper half zero */
    str     x5, [x20, #0x120]
    mov     x6, #0x5555
    ldr     x6, [x20, #0x30]        /* the model says UNHANDLED: reads as zero */
    str     x6, [x20, #0x128]
    str     xzr, [x20, #0x130]      /* register 31 is xzr for a store */
    strb    w1, [x20, #0x138]
    ldp     x7, x8, [x20, #0x40]    /* no syndrome (ISV=0): external abort */
    ldr     w9, [x22, #4]           /* GICD_TYPER as the stub emulates it */
    str     w9, [x20, #0x148]

    gic_on                          /* gic_on.h (w9 = 1) */
    mov     x21, #0
    str     w9, [x20, #0x200]       /* "ready": the model raises INTID 48 */
    wait_irq48                      /* gic_on.h */
    mov     x21, #0
    str     w9, [x20, #0x208]       /* again, now through the UART doorbell only */
    wait_irq48
    mov     w9, #7
    str     w9, [x20, #0x50]        /* QueueNotify: posted, the guest does not wait */
    mov     w9, #9
    str     w9, [x20, #0x64]        /* InterruptACK: posted, after the notify */
    ldr     w10, [x20, #0x60]       /* waits for both: the model answers their sum */
    str     w10, [x20, #0x150]
    ldr     x0, =0x84000008         /* PSCI SYSTEM_OFF */
    smc     #0
5:  b       5b

    .balign 2048
vectors:
    .balign 0x200
    .skip   0x200
sync_spx:                           /* record ESR_EL1, skip the instruction */
    mrs     x9, esr_el1
    str     x9, [x20, #0x140]
    mrs     x9, elr_el1
    add     x9, x9, #4
    msr     elr_el1, x9
    eret
    .balign 0x80
irq_spx:                            /* acknowledge, report the INTID, EOI */
    ldr     w10, [x23, #0xc]
    str     w10, [x20, #0x204]
    str     w10, [x23, #0x10]
    mov     x21, #1
    eret
