/* The probes' GIC bring-up at EL1: the (stub-emulated) distributor on with INTID 48
 * enabled, the CPU interface (GICV) on with priority mask 0xf0, IRQs unmasked.
 * x22 = the distributor, x23 = the CPU interface; leaves w9 = 1. */
.macro gic_on
    mov     w9, #1                  /* distributor on, INTID 48 enabled */
    str     w9, [x22]
    mov     w9, #(1 << 16)
    str     w9, [x22, #0x104]
    mov     w9, #0xf0
    str     w9, [x23, #4]           /* GICC_PMR */
    mov     w9, #1
    str     w9, [x23]               /* GICC_CTLR */
    msr     daifclr, #2
.endm

/* Wait until the IRQ handler set x21, as Linux's idle loop waits: IRQs masked from the
 * check of x21 to the WFI, which wakes on an interrupt pending even when masked (Arm ARM
 * D1 "Wait For Interrupt"), and unmasked after it, where the interrupt is taken. With IRQs unmasked, one
 * taken just before the WFI (the stub injecting as the guest resumes at it) returns to
 * the WFI, which then sleeps for an interrupt that has already come: a lost wake-up. */
.macro wait_irq48
99: msr     daifset, #2
    cbnz    x21, 98f
    wfi
    msr     daifclr, #2
    b       99b
98: msr     daifclr, #2
.endm

/* The probes' EL1 vectors (VBAR_EL1 = vectors): a synchronous exception spins; an IRQ
 * acknowledges INTID 48, EOIs it and sets x21 = 1 (x23 = the CPU interface). */
.macro irq48_vectors
    .balign 2048
vectors:
    .balign 0x200
    .skip   0x200
sync_spx:
    b       sync_spx
    .balign 0x80
irq_spx:
    ldr     w10, [x23, #0xc]
    and     w11, w10, #0x3ff
    cmp     w11, #48
    b.ne    9f
    str     w10, [x23, #0x10]
    mov     x21, #1
9:  eret
.endm
