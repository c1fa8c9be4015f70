"""The output a console port holds for its endpoints: guest buffers on one byte axis."""

import collections

from ..virtio.buffers import IOV_MAX, gather, truncate


class OutputStream:
    """Output waiting for endpoints: segments (lists of memoryviews, not copied) on one
    byte axis. ``head`` is the first byte of the oldest segment not yet done, ``tail``
    the end; each endpoint keeps its own ``position`` on the axis."""

    def __init__(self):
        self.segments = collections.deque()         # [start, length, views, token]
        self.head = self.tail = 0
        self.views = 0                              # memoryviews the segments hold

    @property
    def buffered(self):
        return self.tail - self.head

    def submit(self, views, length, token=None):
        self.segments.append([self.tail, length, views, token])
        self.tail += length
        self.views += len(views)

    def views_from(self, position, limit=None):
        """Memoryviews of the bytes from ``position`` (at most IOV_MAX views, ``limit`` bytes)."""
        out = []
        left = self.tail - position if limit is None else min(limit, self.tail - position)
        for start, length, views, _ in self.segments:
            if left <= 0 or len(out) >= IOV_MAX:
                break
            skip = position - start
            if skip >= length:
                continue
            for view in views:
                if skip >= len(view) or not len(view):
                    skip -= len(view)
                    continue
                if skip > 0:
                    view, skip = view[skip:], 0
                if len(view) > left:
                    view = view[:left]
                out.append(view)
                left -= len(view)
                if not left or len(out) >= IOV_MAX:
                    break
        return out

    def take_done(self, upto):
        """Remove the segments ending at or before ``upto``: their ``(token, length)``."""
        done = []
        segments = self.segments
        while segments and segments[0][0] + segments[0][1] <= upto:
            _, length, views, token = segments.popleft()
            self.views -= len(views)
            done.append((token, length))
        self.head = segments[0][0] if segments else self.tail
        return done

    def own(self, keep, token, limit):
        """Copy the bytes of every segment whose token is not in ``keep`` (views of guest
        RAM the guest may now reuse) and give it ``token``: the bytes stay where they are on
        the axis. At most ``limit`` bytes from ``head`` are kept: the axis ends there, what
        lay past it is dropped (one guest buffer may be larger than any bound on what is
        held: copied whole, 300 MiB stayed in the daemon). Returns ``(token, length)`` of the
        bytes dropped from each segment whose token is in ``keep`` (its owner counts them)."""
        cut, end = [], self.head + limit
        while self.segments and self.segments[-1][0] >= end:
            _, length, views, old = self.segments.pop()
            self.views -= len(views)
            if old in keep:
                cut.append((old, length))
        self.tail = min(self.tail, end)
        for segment in self.segments:
            start, length, views, old = segment
            if start + length > end:            # the last one: only what is kept is copied
                views, segment[1] = truncate(views, end - start), end - start
                if old in keep:
                    cut.append((old, length - segment[1]))
            if old in keep and segment[1] == length:
                continue
            data = bytearray(segment[1])
            gather(views, data)
            self.views += 1 - len(segment[2])
            segment[2] = [memoryview(data)]
            if old not in keep:
                segment[3] = token
        return cut

    def clear(self):
        """Drop everything (a device reset: nothing in flight was acknowledged)."""
        self.segments.clear()
        self.head = self.tail
        self.views = 0
