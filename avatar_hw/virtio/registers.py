"""The virtio-mmio register table (VirtIO 1.2 sections 4.2.2, 4.2.4): which offset is
which register of ``MmioTransport``, for a modern (Version 2) or legacy (Version 1)
window, and the registers a register shadow page mirrors.

A register's handler is the transport's public register method, ``read_<register>()``
or ``write_<register>(value)`` (``MmioTransport``; ``LegacyRegisters`` for Version 1's),
or, for a register that only reads state, a function here."""

import functools

from . import constants as c

_MASK32 = 0xFFFFFFFF

# The registers a register shadow page mirrors (avatar_hw.shadow): read without side
# effects, changed only by the model (on a write the guest made, or through the context).
SHADOWED = (c.REG_MAGIC_VALUE, c.REG_VERSION, c.REG_DEVICE_ID, c.REG_VENDOR_ID,
             c.REG_DEVICE_FEATURES, c.REG_QUEUE_NUM_MAX, c.REG_QUEUE_READY,
             c.REG_INTERRUPT_STATUS, c.REG_STATUS, c.REG_CONFIG_GENERATION)


@functools.cache
def register_tables(t, legacy):
    """``(reads, writes)``: register offset -> function of the transport class ``t``'s
    instance (and the value written), made once per interface version and shared by
    every transport."""
    reads = {
        c.REG_MAGIC_VALUE: lambda self: c.MMIO_MAGIC,
        c.REG_VERSION: lambda self: (c.MMIO_VERSION_LEGACY if self.legacy
                                     else c.MMIO_VERSION_MODERN),
        c.REG_DEVICE_ID: lambda self: self.device.device_id,
        c.REG_VENDOR_ID: lambda self: c.VENDOR_ID,
        c.REG_DEVICE_FEATURES: t.read_device_features,
        c.REG_QUEUE_NUM_MAX: t.read_queue_num_max,
        c.REG_INTERRUPT_STATUS: lambda self: self.context.interrupt_status,
        c.REG_STATUS: lambda self: self.context.status,
    }
    writes = {
        c.REG_DEVICE_FEATURES_SEL: t.write_device_features_sel,
        c.REG_DRIVER_FEATURES: t.write_driver_features,
        c.REG_DRIVER_FEATURES_SEL: t.write_driver_features_sel,
        c.REG_QUEUE_SEL: t.write_queue_sel,
        c.REG_QUEUE_NUM: t.write_queue_num,
        c.REG_QUEUE_NOTIFY: t.write_queue_notify,
        c.REG_INTERRUPT_ACK: t.write_interrupt_ack,
        c.REG_STATUS: t.write_status,
    }
    if legacy:
        reads[c.REG_QUEUE_PFN] = t.read_queue_pfn
        writes[c.REG_GUEST_PAGE_SIZE] = t.write_guest_page_size
        writes[c.REG_QUEUE_ALIGN] = t.write_queue_align
        writes[c.REG_QUEUE_PFN] = t.write_queue_pfn
    else:
        reads.update({
            c.REG_QUEUE_READY: t.read_queue_ready,
            c.REG_SHM_LEN_LOW: lambda self: _MASK32,      # no shared memory regions:
            c.REG_SHM_LEN_HIGH: lambda self: _MASK32,     # length reads as -1 (4.2.2)
            c.REG_SHM_BASE_LOW: lambda self: 0,
            c.REG_SHM_BASE_HIGH: lambda self: 0,
            # the reset is done when its write returns: VirtIO 1.2 wants 1 only while a
            # queue reset is ongoing, then 0 in both QueueReset and QueueReady
            c.REG_QUEUE_RESET: lambda self: 0,
            c.REG_CONFIG_GENERATION: lambda self: self.context.config_generation,
        })
        writes.update({
            c.REG_QUEUE_READY: t.write_queue_ready,
            c.REG_SHM_SEL: t.write_shm_sel,
            c.REG_QUEUE_RESET: t.write_queue_reset,
        })
        for reg, attr in ((c.REG_QUEUE_DESC_LOW, "desc_addr"),
                          (c.REG_QUEUE_DRIVER_LOW, "driver_addr"),
                          (c.REG_QUEUE_DEVICE_LOW, "device_addr")):
            writes[reg] = t.ring_address_writer(attr, 0)
            writes[reg + 4] = t.ring_address_writer(attr, 32)
    return reads, writes
