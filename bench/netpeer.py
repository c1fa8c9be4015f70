"""The host end of the net figure: counts the Ethernet frames a guest sends to it.

    python -m bench.netpeer PATH [SWITCH]

Binds a Unix datagram socket at PATH (one datagram = one Ethernet frame: QEMU's
``-netdev dgram`` sends there, and avatar-hw's switch does once this socket joined it
with an empty datagram to SWITCH), prints ``ready``, and counts frames until a
line on stdin; then, once nothing arrived for ``IDLE`` s, prints one JSON line:
frames of ``avbench net-tx``'s EtherType (the guest's own IPv6 and ARP frames are not
counted), their payload bytes, and the host times of the first and last one. A process of
its own, so it shares no GIL with the daemon.
"""

import json
import os
import select
import socket
import sys
import time

IDLE = 1.0
HEADER = 14
ETHERTYPE = b"\x88\xb5"        # bench/guest/avbench.c NET_ETHERTYPE


def main(path, switch=None):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(path)
    if switch:
        sock.sendto(b"", switch)
    print("ready", flush=True)
    buf = bytearray(65536)
    frames = payload = 0
    first = last = None
    stopping = False
    while True:
        ready, _, _ = select.select([sock, sys.stdin], [], [], IDLE)
        if sys.stdin in ready:
            sys.stdin.readline()
            stopping = True
        if sock in ready:
            while True:
                try:
                    n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if buf[12:14] != ETHERTYPE:
                    continue
                last = time.perf_counter()
                first = first or last
                frames += 1
                payload += n - HEADER
        elif stopping:
            break
    print(json.dumps({"frames": frames, "bytes": payload, "first": first, "last": last}),
          flush=True)
    sock.close()
    os.unlink(path)


if __name__ == "__main__":
    main(*sys.argv[1:])
