/*
 * start.S - entry at EL2 (CPU0 at _start, the others at secondary_start by
 * PSCI CPU_ON from CPU0), the exception vectors and the guest entry. Each CPU
 * has its own stack (STACK_SIZE below __stack_top per CPU) and its index in
 * TPIDR_EL2.
 *
 * Exceptions from the guest (lower EL, AArch64) save x0-x30 in a struct
 * guest_regs on the stub's stack, call handle_sync / handle_irq in C with a
 * pointer to it, restore and ERET. The stub itself runs with PSTATE.DAIF
 * masked, so an exception taken from EL2 is a stub bug: stub_fatal logs it.
 */
#define STACK_SIZE 0x4000    /* link.ld reserves MAX_VMS of them */

    .section .text.boot, "ax"
    .global _start
_start:
    msr     daifset, #0xf
    msr     tpidr_el2, xzr
    ldr     x1, =__stack_top
    mov     sp, x1
    ldr     x1, =vectors
    msr     vbar_el2, x1
    isb
    ldr     x1, =__bss_start
    ldr     x2, =__bss_end
1:  cmp     x1, x2
    b.hs    2f
    str     xzr, [x1], #8
    b       1b
2:  bl      stub_main
3:  wfi
    b       3b

/* secondary_start(x0 = CPU index), from PSCI CPU_ON: its stack, vectors, then C. */
    .global secondary_start
secondary_start:
    msr     daifset, #0xf
    msr     tpidr_el2, x0
    ldr     x1, =__stack_top
    mov     x2, #STACK_SIZE
    msub    x1, x0, x2, x1
    mov     sp, x1
    ldr     x1, =vectors
    msr     vbar_el2, x1
    isb
    bl      secondary_main
5:  wfi
    b       5b

    .text
/* enter_guest(entry, dtb): ERET to EL1h at entry with x0 = dtb, x1-x3 = 0, DAIF masked. */
    .global enter_guest
enter_guest:
    msr     elr_el2, x0
    mov     x2, #0x3c5
    msr     spsr_el2, x2
    mov     x0, x1
    mov     x1, xzr
    mov     x2, xzr
    mov     x3, xzr
    isb
    eret

/* smc_call(x0..x3) -> x0: forward a PSCI call to the firmware (QEMU's PSCI). */
    .global smc_call
smc_call:
    smc     #0
    ret

.macro SAVE_GUEST
    sub     sp, sp, #256
    stp     x0, x1, [sp, #0]
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    str     x30, [sp, #240]
    mov     x0, sp
.endm

.macro RESTORE_GUEST_ERET
    ldp     x0, x1, [sp, #0]
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldr     x30, [sp, #240]
    add     sp, sp, #256
    eret
.endm

.macro VECTOR target
    .balign 0x80
    b       \target
.endm

    .balign 0x800
vectors:
    VECTOR  el2_fatal       /* current EL, SP_EL0: sync */
    VECTOR  el2_fatal       /* irq */
    VECTOR  el2_fatal       /* fiq */
    VECTOR  el2_fatal       /* serror */
    VECTOR  el2_fatal       /* current EL, SP_ELx: sync */
    VECTOR  el2_fatal       /* irq */
    VECTOR  el2_fatal       /* fiq */
    VECTOR  el2_fatal       /* serror */
    VECTOR  guest_sync      /* lower EL, AArch64: sync */
    VECTOR  guest_irq       /* irq */
    VECTOR  guest_irq       /* fiq */
    VECTOR  el2_fatal       /* serror */
    VECTOR  el2_fatal       /* lower EL, AArch32 */
    VECTOR  el2_fatal
    VECTOR  el2_fatal
    VECTOR  el2_fatal

guest_sync:
    SAVE_GUEST
    bl      handle_sync
    RESTORE_GUEST_ERET

guest_irq:
    SAVE_GUEST
    bl      handle_irq
    RESTORE_GUEST_ERET

el2_fatal:
    bl      stub_fatal
4:  wfi
    b       4b
