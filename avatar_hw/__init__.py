"""avatar-hw: the userspace VirtIO device model of the Avatar hypervisor.

``avatar_hw.Subsystem`` is the entry point of the Python API (docs/api.md).
"""


def __getattr__(name):
    # Lazy, so ``avatar-hw`` subcommands that do not need the VirtIO core start
    # without loading it.
    if name == "Subsystem":
        from .virtio.subsystem import Subsystem
        return Subsystem
    raise AttributeError(f"module 'avatar_hw' has no attribute {name!r}")
