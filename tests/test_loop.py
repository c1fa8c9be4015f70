"""The daemon's event loop (avatar_hw/loop.py) on real descriptors: readers and writers on one
descriptor, a hang-up watch, a callback removed by an earlier one of the same turn, timers."""

import socket

from avatar_hw.loop import EventLoop


def test_a_reader_and_a_writer_on_one_socket_each_get_their_event():
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    calls = []
    loop.add_writer(ours, lambda: calls.append("write"))
    loop.add_reader(ours, lambda: calls.append("read"))
    loop.run_once(0)
    assert calls == ["write"]                   # nothing to read yet
    theirs.send(b"x")
    calls.clear()
    loop.run_once(0)
    assert calls == ["read", "write"]
    loop.remove_writer(ours)
    calls.clear()
    loop.run_once(0)
    assert calls == ["read"] and loop.watches(ours)
    loop.remove_reader(ours)
    assert not loop.watches(ours)
    loop.close()
    ours.close()
    theirs.close()


def test_a_hangup_watch_sees_the_peer_close_and_nothing_before():
    """A socket whose reading side is shut is always readable: only its peer's close wakes
    a hang-up watch; removed, the descriptor leaves the loop."""
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    ours.shutdown(socket.SHUT_RD)
    calls = []
    loop.add_hangup(ours, lambda: calls.append("hangup"))
    assert loop.watches(ours)
    loop.run_once(0)                            # readable (shut), not hung up
    assert calls == []
    theirs.close()
    loop.run_once(0)
    assert calls == ["hangup"]
    loop.remove_hangup(ours)
    assert not loop.watches(ours)
    loop.close()
    ours.close()


def test_a_callback_removed_earlier_in_the_same_turn_is_not_called():
    """Both sockets are readable in one turn; whichever runs first removes the other's
    reader (a device closing a backend), which must not be called with its stale event."""
    loop = EventLoop()
    pairs = [socket.socketpair() for _ in range(2)]
    called = []

    def reader(mine, other):
        def callback():
            called.append(mine)
            loop.remove_reader(pairs[other][0])
        return callback

    for n, (ours, theirs) in enumerate(pairs):
        loop.add_reader(ours, reader(n, 1 - n))
        theirs.send(b"x")
    loop.run_once(0)
    assert len(called) == 1
    loop.close()
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


def test_a_reader_removing_its_own_writer_stops_the_writer_in_that_turn():
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    calls = []
    loop.add_reader(ours, lambda: (calls.append("read"), loop.remove_writer(ours)))
    loop.add_writer(ours, lambda: calls.append("write"))
    theirs.send(b"x")
    loop.run_once(0)
    assert calls == ["read"]
    loop.close()
    ours.close()
    theirs.close()


def test_timers_run_in_order_and_a_cancelled_one_never():
    loop = EventLoop()
    ran = []
    loop.call_later(0.02, lambda: ran.append("second"))
    cancelled = loop.call_later(0.01, lambda: ran.append("cancelled"))
    loop.call_later(0.01, lambda: ran.append("first"))
    loop.cancel(cancelled)
    while len(ran) < 2:
        loop.run_once()                         # sleeps until the next timer is due
    assert ran == ["first", "second"]
    loop.close()


def test_a_descriptor_closed_while_registered_does_not_hide_the_next_one_with_its_number():
    """A reader left registered on a closed socket: the next socket given that number is
    registered with epoll afresh (readable, its own callback runs; the old one never)."""
    loop = EventLoop()
    old, _ = socket.socketpair()
    called = []
    loop.add_reader(old, lambda: called.append("old"))
    number = old.fileno()
    old.close()                                 # without remove_reader: epoll drops it
    new, peer = socket.socketpair()
    assert new.fileno() == number               # the lowest free number
    loop.add_writer(new, lambda: called.append("new writer"))
    loop.add_reader(new, lambda: called.append("new reader"))
    peer.send(b"x")
    loop.run_once(0)
    assert called == ["new reader", "new writer"]
    loop.close()
    for sock in (new, peer, _):
        sock.close()
