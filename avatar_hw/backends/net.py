"""Host sides of a virtio-net device, chosen by URL: whole Ethernet frames in and out.

    open_net_backend("tap:avtap0")                  a Linux TAP interface (created, or an
                                                    existing one attached by name)
    open_net_backend("switch:/run/avatar/net0.sock")  a port of an L2 switch on a Unix
                                                    datagram socket (no privileges needed)

A backend moves frames; the device owns the guest's buffers. Receiving is
driven by the backend: when a frame is there it calls
``device.receive(reader, source)``, and the device calls
``reader(source, views)`` with the memoryviews the frame goes into (guest
receive buffers, or a slot of its bounded pending frames, ``rx_pending``). A
reader returns the frame's length, more than ``sum(len(views))`` when the frame did not fit (it
is then consumed and dropped), or None when there is nothing to read.
Sending is ``send(views, length) -> bool``: False means the frame was dropped
(network semantics: a full socket, an interface that is down). ``change_mac(mac)``:
the device's MAC is now ``mac`` (a restarted daemon took back the one the guest read).

The schemes, one module each: ``avatar_hw.backends.tap`` (``tap:NAME``) and
``avatar_hw.backends.switch`` (``switch:PATH``: the L2 switch, its MAC locking and
its flow control), each with ``open_url(url, rest)``.
"""

import importlib

from ..errors import ConfigError

SCHEMES = ("tap", "switch")
RX_BATCH = 64                    # frames read per readiness callback (fairness)
BUSY = "busy"                    # send(): not taken now; device.transmit_ready() follows


def open_net_backend(url):
    """A backend from its URL (see the module docstring)."""
    scheme, _, rest = url.partition(":")
    if scheme not in SCHEMES:
        raise ConfigError(url, None, f"unknown net backend {scheme!r}; use "
                          + " or ".join(f"{s}:" for s in SCHEMES))
    return importlib.import_module(f".{scheme}", __package__).open_url(url, rest)
