"""A virtio-console port: its two queues, its host side, and the flow control between them.

Flow control (nothing lost):

* host -> guest: a port reads its backend only while it holds a guest
  receive buffer (and, for a multiport port other than the console, while
  the guest has it open: Linux discards data for closed ports); otherwise it
  pauses the backend's reader and resumes when the guest posts buffers.
* guest -> host: transmit buffers are handed to the backend as they are
  (memoryviews of guest RAM, no copy) and held until every attached
  endpoint has handed all their bytes to the kernel; only then does the
  guest get them back. The held buffers are the output buffer, bounded by
  the backend (``limit`` bytes, ``MAX_HELD`` buffers); while it is full the
  port takes no more and asks the driver not to notify (``set_notification``).
  So a byte the guest saw acknowledged survives the daemon's death. With no
  attached endpoint (no client on a socket) the guest does not wait: its
  output goes to the backend's bounded unattached log (``log_size``), which
  the next client receives first.
* emergency writes (``avatar_hw.devices.console``) are copied into port 0's
  stream with the token ``EMERGENCY``.
* a device reset drops what is in flight (none of it was acknowledged).
* a restart under a running guest (``avatar_hw.state``): after each flush the port
  stores in two 32-bit words of the context's ``words`` the available-ring position of
  its first transmit chain not yet wholly handed to every attached endpoint (with a
  bit saying the words are set) and the bytes of it that were: everything before is
  delivered. After a restart the transmit chains that were in flight come back through
  ``pop``; those before that point are returned at once, the one at it is sent from
  that byte on. The byte count is stored first, the position after it: a process that
  dies between the two leaves a count for the next chain beside the position of one
  wholly delivered, which repeats bytes and loses none, as does words stale by a flush
  (the process died between the write and the stores).
"""

from ..backends.console import LOGGED
from ..virtio.buffers import skip

EMERGENCY = object()                     # the token of emergency bytes in port 0's stream
_SET = 1 << 16                           # a port's first word: the words are set (restore)


def port_queues(port_id):
    """The (receiveq, transmitq) indices of a port (5.3.2 Virtqueues: port 0 at 0/1, the
    control queues at 2/3, port n >= 1 at 2n + 2 / 2n + 3)."""
    return (0, 1) if port_id == 0 else (2 * port_id + 2, 2 * port_id + 3)


class ConsolePort:
    """One port: its two queues, its backend, and the flow-control state of each direction."""

    def __init__(self, device, port_id, backend, name=None):
        self.device, self.id, self.name = device, port_id, name
        self.rx_index, self.tx_index = port_queues(port_id)
        self.backend = backend
        self.guest_open = False
        self.guest_ready = False         # the driver sent PORT_READY (multiport)
        self.host_open = None            # what the driver was last told (PORT_OPEN)
        self.rx_chain = None             # the receive buffer being filled
        self._tx_notify = True           # what the driver was last asked (notifications on)
        self._input_paused = False
        self._resent = {}                # head -> (position, bytes delivered): ``restore``

    @property
    def rxq(self):
        return self.device.queues[self.rx_index]

    @property
    def txq(self):
        return self.device.queues[self.tx_index]

    def reset(self):
        """Drop chains held from the guest (their queues are being reset)."""
        self.drop_rx()
        self.drop_tx()
        self.guest_open = self.guest_ready = False
        self.host_open = None

    def drop_rx(self):
        """Forget the receive buffer being filled (its queue was reset)."""
        self.rx_chain = None

    def drop_tx(self):
        """Forget the transmit buffers in flight (their queue was reset; their bytes still
        go out, copied: ``discard_output``; emergency bytes past its cut are dropped)."""
        for _, length in self.backend.discard_output(keep=(EMERGENCY,)):
            self.device.emergency_done(length, written=False)
        self._tx_notify = True
        self._resent.clear()

    # -- a restart under a running guest ---------------------------------------------------------

    def _keep_sent(self):
        """Store how far every attached endpoint has the output (module docstring)."""
        context, txq, word = self.device.context, self.txq, 2 * self.id
        if context is None or word + 1 >= len(context.words) or not txq.ready:
            return
        stream = self.backend.stream
        positions = [ep.position for ep in self.backend.endpoints if ep.attached]
        upto = min(positions) if positions else stream.tail
        position, sent = txq.last_avail_idx, 0
        for start, length, _, token in stream.segments:
            if token is not LOGGED and token is not EMERGENCY and start + length > upto:
                position = txq.position(token.head)
                sent = max(0, upto - start) + self._delivered(token.head, position)
                break
        context.words[word + 1] = min(sent, 0xFFFFFFFF)
        context.words[word] = _SET | position

    def restore(self, words):
        """After a restart: which transmit chains handed back were delivered, wholly or
        in part (``words``: the context's words as the previous process left them). Kept
        with each chain's position: a chain the replay finds bad is returned by the queue,
        and a later chain with its head is not the one delivered."""
        word, txq = 2 * self.id, self.txq
        self._resent.clear()
        if word + 1 >= len(words) or not words[word] & _SET or not txq.ready:
            return
        position, sent = words[word] & 0xFFFF, words[word + 1]
        newest = txq.last_avail_idx
        age = (newest - position) & 0xFFFF
        for head in txq.replaying:
            position = txq.position(head)
            chain_age = (newest - position) & 0xFFFF
            if chain_age > age:
                self._resent[head] = position, -1          # wholly delivered
            elif chain_age == age and sent:
                self._resent[head] = position, sent

    def _delivered(self, head, position):
        """Bytes of the chain ``head`` popped at ``position`` delivered before a restart
        (-1: all of them)."""
        kept = self._resent.get(head)
        return kept[1] if kept is not None and kept[0] == position else 0

    def _unsent(self, chain):
        """``chain``'s readable views and length less what was delivered before a restart."""
        if not self._resent:
            return chain.readable, chain.readable_len
        done = self._delivered(chain.head, self.txq.position(chain.head))
        if not done:
            self._resent.pop(chain.head, None)    # another chain's, if any: done with
            return chain.readable, chain.readable_len
        if done < 0 or done >= chain.readable_len:
            self._resent.pop(chain.head)
            return [], 0
        return skip(chain.readable, done), chain.readable_len - done

    # -- host -> guest ---------------------------------------------------------------------------

    def fill_rx(self):
        """Move backend input into guest receive buffers while both exist."""
        device, rxq = self.device, self.rxq
        if not (device.active and rxq.ready and self.guest_open):
            self._pause_input()
            return
        completed = False
        while True:
            if self.rx_chain is None:
                chain = rxq.pop()
                if chain is None:
                    self._pause_input()
                    break
                if not chain.writable_len:
                    device.guest_error("port %d: receive buffer with no writable part; "
                                       "returned empty", self.id)
                    rxq.add_used(chain, 0)
                    completed = True
                    continue
                self.rx_chain = chain
            self._resume_input()
            n = self.backend.readinto(self.rx_chain.writable)
            if not n:
                break
            rxq.add_used(self.rx_chain, n)
            device.count(bytes_to_guest=n)
            self.rx_chain = None
            completed = True
        if completed:
            device.signal_used(rxq)

    def _pause_input(self):
        if not self._input_paused:
            self._input_paused = True
            self.backend.pause_input()

    def _resume_input(self):
        if self._input_paused:
            self._input_paused = False
            self.backend.resume_input()

    # -- guest -> host ---------------------------------------------------------------------------

    def drain_tx(self):
        """Hand transmit buffers to the backend; return each once every attached endpoint
        has taken all its bytes."""
        device, txq, backend = self.device, self.txq, self.backend
        faults = device.context.faults if device.context is not None else None
        if faults is not None and faults.output_stalled(self.drain_tx):
            return                                # an injected stall (avatar_hw.faults)
        if self._tx_notify and backend.idle and not txq.has_available():
            return                                # an empty notify: nothing to hand or return
        returned = self._return_done()
        if device.active and txq.ready and not backend.attached:
            returned += self._log_unattached()
            self._keep_sent()
        elif device.active and txq.ready:
            while True:
                emptied = False                   # pop found the ring empty
                while backend.can_take():
                    chain = txq.pop()
                    if chain is None:
                        emptied = True
                        break
                    views, length = self._unsent(chain)
                    if length:
                        backend.submit(views, length, chain)
                    else:
                        txq.add_used(chain, 0)
                        returned += 1
                backend.flush()
                self._keep_sent()
                done = self._return_done()
                returned += done
                if done and not emptied:
                    continue                      # room again for chains still waiting
                take = backend.can_take()
                if take == self._tx_notify:
                    break
                self._tx_notify = take
                if not (txq.set_notification(take) and take):
                    break
        else:
            backend.flush()                       # emergency bytes
            returned += self._return_done()
            self._keep_sent()
        if returned:
            device.signal_used(txq)

    def _log_unattached(self):
        """Nobody reads: the output goes to the backend's log and straight back to the
        guest (which must not wait, see ``avatar_hw.backends.console``); the number of
        chains returned."""
        device, txq, backend = self.device, self.txq, self.backend
        returned = self._complete(backend.spill())
        for chain in txq:
            backend.log_output(self._unsent(chain)[0])
            txq.add_used(chain, 0)
            device.count(bytes_from_guest=chain.readable_len)
            returned += 1
        if not self._tx_notify:
            self._tx_notify = True
            txq.set_notification(True)
            if txq.has_available() and not txq.yielded:
                returned += self._log_unattached()
        return returned

    def _return_done(self):
        """Give back what the backend is done with; the number of chains returned."""
        return self._complete(self.backend.take_done())

    def _complete(self, done):
        """Return the transmit chains of ``done`` (``(token, length)``); their number."""
        returned = 0
        device = self.device
        for token, length in done:
            if token is EMERGENCY:
                device.emergency_done(length)
                continue
            self._resent.pop(token.head, None)
            self.txq.add_used(token, 0)
            device.count(bytes_from_guest=length)
            returned += 1
        return returned
