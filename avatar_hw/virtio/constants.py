"""Numbers fixed by the VirtIO 1.2 specification (virtio-mmio, split rings, device IDs).

Section references are to VirtIO 1.2: 2.1 status, 2.7 split virtqueues,
4.2.2 the virtio-mmio register layout, 5 device IDs, 6 reserved feature bits.
"""

# -- device status (2.1) ------------------------------------------------------
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# -- reserved feature bits (6) ------------------------------------------------
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36
F_SR_IOV = 37
F_NOTIFICATION_DATA = 38
F_NOTIF_CONFIG_DATA = 39
F_RING_RESET = 40

# -- split virtqueue (2.7) ----------------------------------------------------
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
DESC_SIZE = 16
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4
MAX_QUEUE_SIZE = 32768

# -- virtio-mmio registers (4.2.2) ---------------------------------------------
MMIO_MAGIC = 0x74726976  # "virt"
MMIO_VERSION_LEGACY = 1
MMIO_VERSION_MODERN = 2
VENDOR_ID = 0x52545641  # "AVTR" in memory order

REG_MAGIC_VALUE = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_GUEST_PAGE_SIZE = 0x028      # legacy only
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_ALIGN = 0x03C          # legacy only
REG_QUEUE_PFN = 0x040            # legacy only
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_SEL = 0x0AC
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_LEN_HIGH = 0x0B4
REG_SHM_BASE_LOW = 0x0B8
REG_SHM_BASE_HIGH = 0x0BC
REG_QUEUE_RESET = 0x0C0
REG_CONFIG_GENERATION = 0x0FC
REG_CONFIG = 0x100

INT_USED_BUFFER = 0x1
INT_CONFIG_CHANGE = 0x2

# -- device IDs (5) -------------------------------------------------------------
ID_NET = 1
ID_BLOCK = 2
ID_CONSOLE = 3
ID_RNG = 4
ID_BALLOON = 5
ID_SCSI = 8
ID_9P = 9
ID_GPU = 16
ID_INPUT = 18
ID_VSOCK = 19


def bit(n):
    """The feature mask of feature bit ``n``."""
    return 1 << n
