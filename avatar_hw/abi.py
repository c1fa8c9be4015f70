"""The trap page: the ABI between Avatar's EL2 stub and the device model.

Mirror of ``boards/abi/avatar_trap.h``; docs/trap-abi.md is the description.
The structures are ctypes views made once over the mapped page, so field
reads and writes are single accesses of the field's width; the slot ``state``
word is only touched with load-acquire / store-release (``Region``).
"""

import ctypes

from .errors import AvatarError

MAGIC = 0x50545641  # "AVTP" in memory order
ABI_MAJOR = 1
ABI_MINOR = 5
PAGE_SIZE = 4096
SLOTS_OFFSET = 128
SLOT_SIZE = 64
MAX_SLOTS = (PAGE_SIZE - SLOTS_OFFSET) // SLOT_SIZE

F_POSTED_WRITES = 1 << 0
F_VIRQ_REQUEST = 1 << 1
F_REGISTER_SHADOW = 1 << 2
F_STUB_ACK = 1 << 3             # the stub takes InterruptACK writes (ABI 1.2)
F_HALT_POLL = 1 << 4            # the stub publishes virq_polling; no ring for a polled INTID (1.3)
F_PACE = 1 << 5                 # the stub waits slot.pace_us before posting an access (1.4)
F_RINGS_TAKEN = 1 << 6          # the stub counts the rings it took; one ring per count (1.5)
PACE_MAX_US = 100_000           # the longest wait a stub honours
SUPPORTED_FEATURES = (F_POSTED_WRITES | F_VIRQ_REQUEST | F_REGISTER_SHADOW | F_STUB_ACK
                      | F_HALT_POLL | F_PACE | F_RINGS_TAKEN)

MODEL_DETACHED, MODEL_ATTACHED = 0, 1
STUB_NOT_READY, STUB_READY = 0, 1
SLOT_FREE, SLOT_POSTED, SLOT_DONE = 0, 1, 2
DIR_READ, DIR_WRITE = 0, 1
STATUS_OK, STATUS_UNHANDLED = 0, 1
SLOT_F_POSTED_WRITE = 1 << 0

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class Header(ctypes.LittleEndianStructure):
    _fields_ = [
        ("magic", u32),
        ("abi_major", u16),
        ("abi_minor", u16),
        ("slot_count", u32),
        ("slot_size", u32),
        ("slots_offset", u32),
        ("stub_features", u32),
        ("model_features", u32),
        ("model_state", u32),
        ("counter_hz", u64),
        ("stub_state", u32),
        ("model_pid", u32),
        ("model_sleeping", u32),
        ("shadow_offset", u32),
        ("shadow_count", u32),
        ("rings_taken", u32),
        ("virq_pending", u32 * 8),
        ("virq_polling", u32 * 8),
    ]


class Slot(ctypes.LittleEndianStructure):
    _fields_ = [
        ("state", u32),
        ("seq", u32),
        ("gpa", u64),
        ("data", u64),
        ("size", u8),
        ("direction", u8),
        ("status", u8),
        ("flags", u8),
        ("vm_id", u16),
        ("vcpu_id", u16),
        ("t_post", u64),
        ("t_done", u64),
        ("wfi_caught", u32),
        ("wfi_ran_out", u32),
        ("wfi_slept", u32),
        ("pace_us", u32),
    ]


SHADOW_PAGE_SIZE = 4096
SHADOW_IMAGE_SIZE = 0xF00        # window offsets 0x000..0xeff mirrored at the same offsets
SHADOW_VALID_WORDS = SHADOW_IMAGE_SIZE // 4 // 32


class Shadow(ctypes.LittleEndianStructure):
    """One device window's register shadow (``AVT_F_REGISTER_SHADOW``)."""
    _fields_ = [
        ("image", u8 * SHADOW_IMAGE_SIZE),
        ("seq", u32),
        ("reserved0", u32),
        ("hits", u64),
        ("acks", u32 * 2),
        ("acks_seen", u32 * 2),
        ("reserved1", u8 * 0x60),
        ("valid", u32 * SHADOW_VALID_WORDS),
        ("reserved2", u32 * 2),
    ]


assert ctypes.sizeof(Shadow) == SHADOW_PAGE_SIZE
assert ctypes.sizeof(Header) == SLOTS_OFFSET
assert ctypes.sizeof(Slot) == SLOT_SIZE

STATE_OFFSET = Slot.state.offset
MODEL_STATE_OFFSET = Header.model_state.offset
STUB_STATE_OFFSET = Header.stub_state.offset
MODEL_SLEEPING_OFFSET = Header.model_sleeping.offset
VIRQ_PENDING_OFFSET = Header.virq_pending.offset
VIRQ_POLLING_OFFSET = Header.virq_polling.offset
RINGS_TAKEN_OFFSET = Header.rings_taken.offset
SHADOW_SEQ_OFFSET = Shadow.seq.offset
SHADOW_ACKS_OFFSET = Shadow.acks.offset


class AbiMismatch(AvatarError):
    """The trap page does not carry an ABI this model speaks."""


def check_header(header, where="trap page"):
    """Raise ``AbiMismatch`` (one line) unless ``header`` is a page we can serve."""
    if header.magic != MAGIC:
        raise AbiMismatch(
            f"{where}: magic 0x{header.magic:08x} is not 0x{MAGIC:08x} ('AVTP'): the region is "
            f"not an Avatar trap page (check the UIO name in the board file) or the stub "
            f"has not initialised it yet")
    if header.abi_major != ABI_MAJOR:
        raise AbiMismatch(
            f"{where}: trap ABI {header.abi_major}.{header.abi_minor} but avatar-hw speaks "
            f"{ABI_MAJOR}.{ABI_MINOR}: use a hypervisor and avatar-hw of the same ABI major")
    if header.slot_size != SLOT_SIZE or header.slots_offset != SLOTS_OFFSET:
        raise AbiMismatch(
            f"{where}: slot size {header.slot_size} at offset {header.slots_offset}, expected "
            f"{SLOT_SIZE} at {SLOTS_OFFSET}")
    if not 1 <= header.slot_count <= MAX_SLOTS:
        raise AbiMismatch(
            f"{where}: slot count {header.slot_count} is not between 1 and {MAX_SLOTS}")
