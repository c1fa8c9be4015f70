"""Memory ordering for memory shared with another CPU (the hypervisor stub, a guest).

The protocol rule everywhere in avatar-hw is *publish with a store-release,
observe with a load-acquire*:

- a writer fills the data fields with plain stores, then writes the state
  word with a **store-release**: no earlier load or store may be observed
  after it;
- a reader reads the state word with a **load-acquire**: no later load or
  store may be performed before it; only then does it read the data.

Plain Python (ctypes, memoryview) accesses give no such guarantee on arm64,
whose memory model lets independent accesses be observed out of order. The
acquire/release accesses here call GCC's libatomic (``__atomic_load_N`` /
``__atomic_store_N`` with ``__ATOMIC_ACQUIRE`` / ``__ATOMIC_RELEASE``), which
compile to LDAR/STLR on arm64 and to plain MOVs on x86-64 (TSO already orders
them; the out-of-line call stops compiler reordering). On a hot path a word is read or
written through an accessor bound once (``acquire_reader16``, ``release_writer16``/``32``):
there, on a TSO host, the access is the memoryview's or ctypes array's own single MOV of
the word's width (any C call between two Python accesses orders them for the compiler),
and on arm64 the libatomic call as above. ``fence()`` is a full
``atomic_thread_fence(__ATOMIC_SEQ_CST)`` (DMB ISH on arm64, MFENCE on x86),
needed where a store must be ordered before a later load (for example the
virtqueue "write used index, then read avail_event" rule).

The functions take an absolute address (``Region.address + offset``), which
the caller has bounds- and alignment-checked.
"""

import ctypes
import ctypes.util
import functools
import platform

from ..errors import AvatarError

_ACQUIRE, _RELEASE, _ACQ_REL, _SEQ_CST = 2, 3, 4, 5


def _load_libatomic():
    candidates = [ctypes.util.find_library("atomic"), "libatomic.so.1"]
    for name in candidates:
        if not name:
            continue
        try:
            # PyDLL: these calls never block, so keep the GIL (cheaper call).
            return ctypes.PyDLL(name)
        except OSError:
            continue
    return None


_lib = _load_libatomic()
if _lib is None:
    raise AvatarError(
        "libatomic.so.1 not found: avatar-hw needs it for load-acquire/store-release "
        "accesses to shared memory; install it (apt-get install libatomic1)")


def _bind(name, restype):
    # No ``argtypes``: ctypes' per-call conversion through them was most of a call's cost
    # (0.45 against 0.16 µs). Addresses go in as ``c_void_p`` (a bare int would pass as a
    # C int); values and orders as ints, passed in full registers whose low bits the
    # callee reads (a uint16/uint32 parameter) under both the SysV x86-64 and AAPCS64 ABIs.
    fn = getattr(_lib, name)
    fn.restype = restype
    return fn


_P = ctypes.c_void_p
_load2 = _bind("__atomic_load_2", ctypes.c_uint16)
_load4 = _bind("__atomic_load_4", ctypes.c_uint32)
_store2 = _bind("__atomic_store_2", None)
_store4 = _bind("__atomic_store_4", None)
_fetch_or4 = _bind("__atomic_fetch_or_4", ctypes.c_uint32)
_fetch_and4 = _bind("__atomic_fetch_and_4", ctypes.c_uint32)
_fetch_add4 = _bind("__atomic_fetch_add_4", ctypes.c_uint32)
_fence = _bind("atomic_thread_fence", None)


def load_acquire16(address):
    return _load2(_P(address), _ACQUIRE)


def load_acquire32(address):
    return _load4(_P(address), _ACQUIRE)


def store_release16(address, value):
    _store2(_P(address), value, _RELEASE)


def store_release32(address, value):
    _store4(_P(address), value, _RELEASE)


def fetch_or32(address, bits):
    """Atomically OR ``bits`` into a 32-bit word (acquire-release); returns the old value."""
    return _fetch_or4(_P(address), bits, _ACQ_REL)


def fetch_and32(address, bits):
    """Atomically AND ``bits`` into a 32-bit word (acquire-release); returns the old value."""
    return _fetch_and4(_P(address), bits, _ACQ_REL)


def fetch_add32(address, value):
    """Atomically add ``value`` to a 32-bit word (wrapping; acquire-release); returns the
    old value."""
    return _fetch_add4(_P(address), value, _ACQ_REL)


def fence():
    """Full barrier: orders every earlier load and store before every later one."""
    _fence(_SEQ_CST)


# x86 is TSO: no load is reordered with an older load, no store with an older load or
# store, so GCC emits no instruction for an acquire or a release fence there, and a
# load-acquire or store-release is a plain MOV; these skip the foreign call (0.1-0.5 µs
# from Python, more than the trap's own work).
_TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
# Whether ``acquire_fence`` and ``release_fence`` are instructions here: the trap path tests
# this rather than call a function that does nothing (~30 ns a call on x86).
WEAKLY_ORDERED = not _TSO


def acquire_fence():
    """Orders every earlier load before every later load and store: after plain loads of
    state words, the acquire of those loads. On arm64 a DMB ISH, not DMB ISHLD: libatomic's
    atomic_thread_fence takes the order at run time and issues DMB ISH for any (stronger,
    still correct)."""
    if not _TSO:
        _fence(_ACQUIRE)


def release_fence():
    """Orders every earlier load and store before every later store: before a plain store
    of a state word, its release (DMB ISH then the store on arm64)."""
    if not _TSO:
        _fence(_RELEASE)


def acquire_reader16(view, index, address, tso=_TSO):
    """A callable returning the 16-bit word ``view[index]`` with load-acquire semantics
    (``view``: a memoryview cast to "H" whose item ``index`` is at ``address``), bound once
    for a word read on a hot path (a virtqueue's available index). On a TSO machine the
    memoryview's own load: one 16-bit MOV; elsewhere ``__atomic_load_2`` (LDARH). (``tso``:
    which of the two, for a test of both on one host.)"""
    if tso:
        return functools.partial(view.__getitem__, index)
    return functools.partial(_load2, _P(address), _ACQUIRE)


def release_writer16(view, index, address, tso=_TSO):
    """A callable storing its argument to the 16-bit word ``view[index]`` at ``address``
    with store-release semantics (as ``acquire_reader16``: one 16-bit MOV on a TSO
    machine, ``__atomic_store_2`` (STLRH) elsewhere)."""
    return _release_writer(_store2, view, index, address, tso)


def release_writer32(view, index, address, tso=_TSO):
    """``release_writer16`` for a 32-bit word (``view``: 32-bit items; STLR)."""
    return _release_writer(_store4, view, index, address, tso)


def _release_writer(store, view, index, address, tso):
    if tso:
        return functools.partial(view.__setitem__, index)
    pointer = _P(address)
    return lambda value: store(pointer, value, _RELEASE)
