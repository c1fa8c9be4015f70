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
