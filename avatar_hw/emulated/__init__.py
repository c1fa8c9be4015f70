"""The emulated board: QEMU's virt machine, our EL2 stub and a real arm64 Linux guest.

``memory_map`` (addresses shared with the stub), ``build`` (the stub, cached
by source hash), ``assets`` (kernel and busybox from Debian, cached),
``initramfs``, ``devicetree``, ``machine`` (QEMU launcher, UART doorbell,
interrupt line) and ``demo`` (``avatar-hw demo``). docs/emulated-board.md
describes the design.
"""
