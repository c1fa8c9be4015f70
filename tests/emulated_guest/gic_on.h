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
