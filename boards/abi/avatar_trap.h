/*
 * avatar_trap.h - the trap page shared by Avatar's EL2 stub and avatar-hw.
 *
 * Freestanding C99 (no libc). The authoritative description, with the
 * ordering rules and the state machine, is docs/trap-abi.md; the Python side
 * is avatar_hw/abi.py, and tests/test_abi_header.py compiles this header to
 * check that both agree byte for byte. All fields are little-endian.
 *
 * Memory: both sides map the page (and the model the guests' RAM) Normal,
 * Inner/Outer Write-Back cacheable, Inner Shareable (EL2 stage 1: MAIR attr
 * 0xFF, SH = 0b11); no cache maintenance is needed. The stub may wait for DONE
 * with SEVL; WFE; LDAXR state (the model's store to the slot clears the stub's
 * global monitor, a WFE wake-up event) only on that cacheable mapping: on a
 * Device or Non-cacheable mapping no wake-up is guaranteed, so it must spin.
 *
 * Ordering, in one line each:
 *   stub posts:     write every slot field, then state = POSTED with a
 *                   store-release (STLR), then ring the doorbell if
 *                   model_sleeping (read after a DMB ISH).
 *   model answers:  load-acquire (LDAR) state == POSTED, read the fields,
 *                   handle, write data and status, then state = DONE with a
 *                   store-release (FREE for a posted write).
 *   stub completes: load-acquire state == DONE, read data and status, then
 *                   state = FREE (store-release).
 *   posted write:   the guest resumes at once; the model sets FREE after the
 *                   write's effect; the vCPU's next access is posted only
 *                   after the stub saw FREE (load-acquire), so it is served
 *                   after the write. The model serves every posted
 *                   InterruptACK (only those: a QueueNotify would enter
 *                   device code) before it sets an InterruptStatus bit
 *                   (section 7).
 *   model sleeps:   model_sleeping = 1, DMB ISH, re-scan every slot, then block.
 *   virq request:   atomic OR of virq_pending (release), then, with
 *                   AVT_F_HALT_POLL, DMB ISH and ring only if the INTID's
 *                   virq_polling bit is clear; a stub polls with: set its
 *                   virq_polling bits, DMB ISH, poll virq_pending; clear them,
 *                   DMB ISH, read virq_pending once more before a real WFI.
 *   model detaches: answer every POSTED slot, then model_state = DETACHED
 *                   (store-release); it never touches a slot afterwards. A
 *                   stub that sees DETACHED (load-acquire) loads state once
 *                   more: DONE is an answer given before DETACHED, taken as
 *                   any other; only a slot still POSTED is withdrawn
 *                   (POSTED -> FREE) with its UNHANDLED policy.
 *   model died:     model_state stays ATTACHED; the stub keeps waiting, the
 *                   next model to attach answers the slot.
 *   rings taken:    with AVT_F_RINGS_TAKEN the stub, rung, clears its ring
 *                   source, then rings_taken += 1 (store-release), DMB ISH,
 *                   then takes virq_pending; the model, after its OR and
 *                   DMB ISH, rings only if rings_taken moved since its last
 *                   ring (that ring, not yet taken, will make the stub look).
 *   pace:           the model stores pace_us (plain store: a hint); the stub
 *                   loads it (plain load) before posting and waits that long
 *                   (at most AVT_PACE_MAX_US) with AVT_F_PACE accepted.
 */
#ifndef AVATAR_TRAP_H
#define AVATAR_TRAP_H

typedef unsigned char      avt_u8;
typedef unsigned short     avt_u16;
typedef unsigned int       avt_u32;
typedef unsigned long long avt_u64;

#define AVT_MAGIC            0x50545641u   /* "AVTP" in memory order */
#define AVT_ABI_MAJOR        1u
#define AVT_ABI_MINOR        5u
#define AVT_PAGE_SIZE        4096u
#define AVT_SLOTS_OFFSET     128u
#define AVT_SLOT_SIZE        64u
#define AVT_MAX_SLOTS        ((AVT_PAGE_SIZE - AVT_SLOTS_OFFSET) / AVT_SLOT_SIZE)

/* header.stub_features / header.model_features */
#define AVT_F_POSTED_WRITES  (1u << 0)  /* stub may resume the guest before a write is handled */
#define AVT_F_VIRQ_REQUEST   (1u << 1)  /* stub injects the INTIDs the model sets in virq_pending */
#define AVT_F_REGISTER_SHADOW (1u << 2) /* stub answers reads from the model's register shadows */
#define AVT_F_STUB_ACK       (1u << 3)  /* stub takes InterruptACK writes itself (ack counters) */
#define AVT_F_HALT_POLL      (1u << 4)  /* stub publishes virq_polling while a guest's WFI polls;
                                           the model rings only for INTIDs not polled (1.3) */
#define AVT_F_PACE           (1u << 5)  /* stub waits slot.pace_us before posting the vCPU's
                                           next access: the model slows a VM down (1.4) */
#define AVT_F_RINGS_TAKEN    (1u << 6)  /* stub counts in rings_taken each time it clears its
                                           ring source: the model rings only once per count
                                           (1.5) */
#define AVT_PACE_MAX_US      100000u    /* the longest wait a stub honours (100 ms) */

/* Register shadow pages (AVT_F_REGISTER_SHADOW): page n at header.shadow_offset + n *
 * AVT_SHADOW_PAGE_SIZE mirrors device window n; see struct avt_shadow. */
#define AVT_SHADOW_PAGE_SIZE  4096u
#define AVT_SHADOW_IMAGE_SIZE 0xf00u    /* window offsets 0x000..0xeff */
#define AVT_SHADOW_VALID_WORDS (AVT_SHADOW_IMAGE_SIZE / 4u / 32u)

/* header.model_state */
#define AVT_MODEL_DETACHED   0u
#define AVT_MODEL_ATTACHED   1u

/* header.stub_state */
#define AVT_STUB_NOT_READY   0u
#define AVT_STUB_READY       1u

/* slot.state */
#define AVT_SLOT_FREE        0u
#define AVT_SLOT_POSTED      1u
#define AVT_SLOT_DONE        2u

/* slot.direction */
#define AVT_DIR_READ         0u
#define AVT_DIR_WRITE        1u

/* slot.status */
#define AVT_STATUS_OK        0u
#define AVT_STATUS_UNHANDLED 1u

/* slot.flags */
#define AVT_SLOT_F_POSTED_WRITE (1u << 0) /* the guest already resumed; model frees the slot */

struct avt_header {
    avt_u32 magic;           /*  0 AVT_MAGIC, written by the stub */
    avt_u16 abi_major;       /*  4 */
    avt_u16 abi_minor;       /*  6 */
    avt_u32 slot_count;      /*  8 one slot per vCPU */
    avt_u32 slot_size;       /* 12 AVT_SLOT_SIZE */
    avt_u32 slots_offset;    /* 16 AVT_SLOTS_OFFSET */
    avt_u32 stub_features;   /* 20 AVT_F_* the stub offers */
    avt_u32 model_features;  /* 24 AVT_F_* the model accepted (subset), written before ATTACHED */
    avt_u32 model_state;     /* 28 AVT_MODEL_*, written by the model (store-release) */
    avt_u64 counter_hz;      /* 32 frequency of slot timestamps (the stub's counter) */
    avt_u32 stub_state;      /* 40 AVT_STUB_*, written last by the stub (store-release) */
    avt_u32 model_pid;       /* 44 informational: the daemon's PID while attached */
    avt_u32 model_sleeping;  /* 48 1 while the model waits on the doorbell; 0 while it polls */
    avt_u32 shadow_offset;   /* 52 byte offset of the shadow pages from this page (stub; 0: none) */
    avt_u32 shadow_count;    /* 56 device windows with a shadow page (window numbers 0..n-1) */
    avt_u32 rings_taken;     /* 60 AVT_F_RINGS_TAKEN: stub, store-release */
    avt_u32 virq_pending[8]; /* 64 INTID n is bit (n % 32) of word (n / 32); set by the
                                   model with an atomic OR, taken by the stub with an
                                   atomic exchange or AND (AVT_F_VIRQ_REQUEST) */
    avt_u32 virq_polling[8]; /* 96 AVT_F_HALT_POLL: bit n set (by the stub, atomically)
                                   while a CPU of INTID n's VM polls virq_pending in a
                                   trapped WFI; the model need not ring for n then */
};

struct avt_slot {
    avt_u32 state;           /*  0 AVT_SLOT_* */
    avt_u32 seq;             /*  4 incremented by the stub on every post */
    avt_u64 gpa;             /*  8 faulting guest-physical address */
    avt_u64 data;            /* 16 write value, or the read result (zero-extended) */
    avt_u8  size;            /* 24 access size in bytes: 1, 2, 4 or 8 */
    avt_u8  direction;       /* 25 AVT_DIR_* */
    avt_u8  status;          /* 26 AVT_STATUS_*, written by the model */
    avt_u8  flags;           /* 27 AVT_SLOT_F_* */
    avt_u16 vm_id;           /* 28 */
    avt_u16 vcpu_id;         /* 30 */
    avt_u64 t_post;          /* 32 stub counter when posted */
    avt_u64 t_done;          /* 40 stub counter when the stub saw DONE */
    avt_u32 wfi_caught;      /* 48 AVT_F_HALT_POLL counters (stub only, informational): */
    avt_u32 wfi_ran_out;     /* 52   trapped WFIs completed by a request the poll saw, */
    avt_u32 wfi_slept;       /* 56   polls that ran out, WFIs with no poll window */
    avt_u32 pace_us;         /* 60 AVT_F_PACE: written by the model, read by the stub before
                                   it posts this vCPU's next access (0: none) */
};

/*
 * One device window's register shadow, written only by the model (a seqlock):
 *   model:  seq += 1 (odd), DMB ISH, write image and valid, seq += 1 (even, STLR).
 *   stub, a read at window offset off (not a write, and only once the vCPU's
 *   posted write is served, i.e. its slot is FREE):
 *           s = LDAR seq; if s odd -> trap; if !(valid[w / 32] >> w % 32 & 1)
 *           for the 32-bit word w = off / 4 -> trap; value = image[off..];
 *           DMB ISHLD; if seq != s -> trap; else answer value, hits += 1.
 * InterruptStatus (offset 0x060) with AVT_F_STUB_ACK: bit b of the image is answered
 * only if acks[b] == acks_seen[b] (else the guest acknowledged it since: 0).
 * An InterruptACK write (0x064, 32-bit) with AVT_F_STUB_ACK, once the vCPU's slot is
 * FREE and while InterruptStatus's word is valid: for each bit b < 2 of the value,
 * atomic acks[b] += 1 (release); DMB ISH; the guest resumes (no post).
 * A valid word is read with any access the transport accepts there: registers
 * (window offsets below 0x100) only with aligned 32-bit reads, the
 * configuration space with aligned 8-, 16- and 32-bit reads.
 */
struct avt_shadow {
    avt_u8  image[AVT_SHADOW_IMAGE_SIZE]; /* 0x000 the window's registers at their offsets */
    avt_u32 seq;             /* 0xf00 even: stable; odd: the model is writing */
    avt_u32 reserved0;       /* 0xf04 */
    avt_u64 hits;            /* 0xf08 reads the stub answered here (written by the stub only) */
    avt_u32 acks[2];         /* 0xf10 AVT_F_STUB_ACK: InterruptACK writes the stub took, per
                                     InterruptStatus bit (0: used buffer, 1: configuration
                                     change); written by the stub only, atomically */
    avt_u32 acks_seen[2];    /* 0xf18 the acks[] counts the image's InterruptStatus reflects
                                     (model, inside the seqlock) */
    avt_u8  reserved1[0x60]; /* 0xf20 */
    avt_u32 valid[AVT_SHADOW_VALID_WORDS]; /* 0xf80 bit w % 32 of word w / 32: image word w is current */
    avt_u32 reserved2[2];    /* 0xff8 */
};

typedef char avt_shadow_size_check[(sizeof(struct avt_shadow) == AVT_SHADOW_PAGE_SIZE) ? 1 : -1];
typedef char avt_header_size_check[(sizeof(struct avt_header) == AVT_SLOTS_OFFSET) ? 1 : -1];
typedef char avt_slot_size_check[(sizeof(struct avt_slot) == AVT_SLOT_SIZE) ? 1 : -1];

#endif /* AVATAR_TRAP_H */
