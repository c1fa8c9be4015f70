"""The legacy (Version 1) virtio-mmio registers of ``MmioTransport`` (VirtIO 1.2 section 4.2.4).

GuestPageSize, QueueAlign and QueuePFN replace QueueReady and the 64-bit ring
addresses; features the driver accepted without their being offered are
masked off at DRIVER_OK (there is no FEATURES_OK to refuse them).
"""

from . import constants as c


class LegacyRegisters:
    """Mixed into ``MmioTransport``; uses its queue selection and guest-error log."""

    def _drop_unoffered_legacy_features(self):
        """Legacy drivers have no FEATURES_OK to refuse: features never offered are
        masked off at DRIVER_OK (and logged)."""
        unknown = self.driver_features & ~self.offered_features
        if unknown:
            self.guest_error("legacy driver accepted features 0x%x the device does not "
                             "offer; ignored", unknown)
            self.driver_features &= self.offered_features

    def write_guest_page_size(self, value):
        if value == 0 or value & (value - 1):
            self.guest_error("GuestPageSize %d is not a power of two; ignored", value)
            return
        self.page_size = value

    def write_queue_align(self, value):
        queue = self._configurable_queue("QueueAlign")
        if queue is None:
            return
        if value == 0 or value & (value - 1):
            self.guest_error("QueueAlign %d is not a power of two; ignored", value)
            return
        self.queue_align[queue.index] = value

    def read_queue_pfn(self):
        queue = self._selected_queue()
        if queue is None or not queue.ready:
            return 0
        return queue.desc_addr // self.page_size

    def write_queue_pfn(self, value):
        if value == 0:
            queue = self._selected_queue()
            if queue is not None and queue.ready:
                self._disable_queue(queue)
            else:
                self.context.idle_traps += 1      # changes nothing (``MmioTransport``)
            return
        queue = self._configurable_queue("QueuePFN")
        if queue is None:
            return
        align = self.queue_align[queue.index]
        queue.desc_addr = value * self.page_size
        queue.driver_addr = queue.desc_addr + c.DESC_SIZE * queue.size
        used = queue.driver_addr + 6 + 2 * queue.size
        queue.device_addr = (used + align - 1) & ~(align - 1)
        self._enable_queue(queue)
