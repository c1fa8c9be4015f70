"""Random register sequences and random guest memory: the trap handler never raises,
never answers with an internal error, and never touches memory outside the VM."""

import contextlib
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.testing.hostile import REGISTERS, internal_errors, random_rings, run_ops
from avatar_hw.testing.virtio import RAM_BASE, RecordingDevice, VirtioBench
from avatar_hw.virtio import constants as c

RAM = 64 << 10


@contextlib.contextmanager
def no_internal_errors():
    """Fail if a device error escaped into the subsystem's catch-all."""
    with internal_errors() as records:
        yield
    assert records == []


offsets = st.one_of(st.sampled_from(REGISTERS), st.integers(0, 0x1FF),
                    st.sampled_from([c.REG_CONFIG + i for i in range(16)]))
values = st.one_of(st.integers(0, 0xFFFFFFFF),
                   st.sampled_from([0, 1, 2, 3, 4, 8, 0x0F, 0x40, 0xFF]),
                   st.integers(RAM_BASE - 64, RAM_BASE + RAM + 64))
ops = st.lists(st.tuples(offsets, st.booleans(), st.sampled_from([4, 4, 4, 1, 2, 8]), values),
               max_size=80)

ram_addr = st.one_of(st.integers(RAM_BASE, RAM_BASE + RAM), st.integers(0, 2**64 - 1),
                     st.integers(RAM_BASE + RAM - 32, RAM_BASE + RAM + 32))
good_descriptor = st.tuples(st.integers(RAM_BASE, RAM_BASE + RAM - 256), st.integers(0, 256),
                            st.integers(0, 7), st.integers(0, 9))
any_descriptor = st.tuples(ram_addr, st.one_of(st.integers(0, 256), st.integers(0, 2**32 - 1)),
                           st.integers(0, 7), st.integers(0, 20))
# mostly plausible descriptors, so that chains get deep enough to meet every rule
descriptor = st.one_of(good_descriptor, good_descriptor, good_descriptor, any_descriptor)


def device_for(kind):
    if kind == "console":
        return ConsoleDevice(ports={"p": None}, size=(80, 25))
    return RecordingDevice(queue_sizes=(8, 16), hold=kind == "holding")


# AVATAR_FUZZ_EXAMPLES=3000: a deeper run (docs/devices.md, "Soak"); CI's is 300.
FUZZ = settings(max_examples=int(os.environ.get("AVATAR_FUZZ_EXAMPLES", 300)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(kind=st.sampled_from(["recorder", "holding", "console"]), legacy=st.booleans(), ops=ops)
def test_random_register_sequences(kind, legacy, ops):
    bench = VirtioBench(device_for(kind), ram_size=RAM, legacy=legacy)
    with no_internal_errors():
        run_ops(bench, ops)


@FUZZ
@given(kind=st.sampled_from(["recorder", "holding", "console"]),
       descs=st.lists(descriptor, min_size=16, max_size=16),
       heads=st.lists(st.one_of(st.integers(0, 7), st.integers(0, 20)), min_size=8, max_size=8),
       avail_idx=st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)),
       used_event=st.integers(0, 0xFFFF),
       flags=st.integers(0, 1), features_drop=st.integers(0, 3), ops=ops)
def test_random_rings_after_valid_setup(kind, descs, heads, avail_idx, used_event, flags,
                                        features_drop, ops):
    bench = VirtioBench(device_for(kind), ram_size=RAM)
    # the console (multiport) also gets random control queues 2 and 3
    indices = [0, 1, 2, 3] if kind == "console" else [0, 1]
    with no_internal_errors():
        random_rings(bench, indices, descs, heads, avail_idx, used_event, flags,
                     features_drop, ops)
