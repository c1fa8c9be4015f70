/*
 * doorbell_probe.S - a bare-metal EL1 "guest" that needs every host doorbell.
 * No timer, no other exit: after each "ready" write it waits in WFI until the
 * stub injects INTID 48, which the model requests only while the guest waits,
 * so only the stub's UART RX interrupt can deliver it (tests/test_emulated_stub.py).
 */
#include "gic_on.h"
    .text
    .global _start
_start:
    ldr     x20, =0x0a000000        /* the virtio window */
    ldr     x22, =0x08000000        /* guest distributor (emulated by the stub) */
    ldr     x23, =0x08010000        /* guest CPU interface (GICV) */
    adr     x9, vectors
    msr     vbar_el1, x9
    isb
    gic_on                          /* gic_on.h (w9 = 1) */
    ldr     w24, [x20, #0x300]      /* rounds, from the model */
1:  cbz     w24, 3f
    mov     x21, #0
    str     w24, [x20, #0x200]      /* "ready": the model raises INTID 48 a little later */
    wait_irq48                      /* gic_on.h */
    sub     w24, w24, #1
    b       1b
3:  ldr     x0, =0x84000008         /* PSCI SYSTEM_OFF */
    smc     #0
5:  b       5b

    irq48_vectors                   /* gic_on.h */
