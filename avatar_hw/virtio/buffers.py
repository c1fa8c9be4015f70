"""Guest buffers: the one home of every copy, skip, truncate and vectored-I/O loop over
lists of memoryviews (a ``DescriptorChain``'s ``readable`` / ``writable`` parts, an
output stream's segments).

Rules every helper keeps, whatever the chain (a guest may describe thousands of
descriptors, empty ones, or gigabytes of overlapping ones):

* empty views are skipped before any iovec is built, so a system call never gets a
  vector of nothing (``readv`` would return 0: end of file; ``preadv`` 0: "done");
* vectored calls take at most ``IOV_MAX`` views (``batches``); the loops continue
  after a short count, so a chain of any length moves completely or the count of
  what really moved is returned (never more);
* nothing is copied through ``bytes``: the views are guest RAM, and the kernel reads
  or writes them directly.

``gather`` / ``scatter`` copy between views and a small host buffer (a request
header, a control message): their cost is bounded by the host buffer, never by
the chain.
"""

import os
from bisect import bisect_left
from itertools import accumulate

IOV_MAX = os.sysconf("SC_IOV_MAX")
_ZEROS = bytes(64 << 10)


def gather(views, out):
    """Copy the first bytes of ``views`` into ``out`` (a writable buffer) until it is
    full; the number of bytes copied (less than ``len(out)``: the chain is shorter)."""
    target = memoryview(out)
    done, size = 0, len(target)
    for view in views:
        if done >= size:
            break
        take = min(len(view), size - done)
        target[done:done + take] = view[:take]
        done += take
    target.release()
    return done


def scatter(data, views):
    """Copy ``data`` into ``views`` in order; the number of bytes copied."""
    done = 0
    for view in views:
        if done >= len(data):
            break
        take = min(len(view), len(data) - done)
        view[:take] = data[done:done + take]
        done += take
    return done


def scatter_at(data, views, index, at):
    """Copy ``data`` into ``views`` from byte ``at`` of ``views[index]`` on (they hold
    it): records written one after another; the position after it, ``(index, at)``."""
    done = 0
    while done < len(data):
        view = views[index]
        take = min(len(view) - at, len(data) - done)
        view[at:at + take] = data[done:done + take]
        done += take
        at += take
        if at == len(view):
            index, at = index + 1, 0
    return index, at


def copy(source, views):
    """Copy all of ``source`` (views) into ``views`` if it fits; the length of
    ``source`` (more than ``views`` hold: nothing was copied)."""
    length = sum(len(v) for v in source)
    if length > sum(len(v) for v in views):
        return length
    dst = iter(views)
    out, pos = b"", 0
    for src in source:
        done = 0
        while done < len(src):
            while pos == len(out):
                out, pos = next(dst), 0
            take = min(len(src) - done, len(out) - pos)
            out[pos:pos + take] = src[done:done + take]
            pos += take
            done += take
    return length


def truncate(views, n):
    """The first ``n`` bytes of ``views``, as a list of non-empty memoryviews."""
    if n <= 0:
        return []
    ends = list(accumulate(map(len, views)))      # the views are only looked at in C
    last = bisect_left(ends, n)
    if last == len(ends):                          # all of them
        return list(filter(None, views))
    out = list(filter(None, views[:last]))
    cut = views[last]
    out.append(cut if ends[last] == n else cut[:len(cut) - (ends[last] - n)])
    return out


def skip(views, n):
    """``views`` without their first ``n`` bytes (and without empty views)."""
    first = 0
    for view in views:                              # only the views skipped, one by one
        if n < len(view):
            break
        n -= len(view)
        first += 1
    out = list(filter(None, views[first:]))
    if n and out:
        out[0] = out[0][n:]
    return out


def batches(views):
    """``views`` as lists of at most ``IOV_MAX`` non-empty views, in order."""
    batch = []
    for view in views:
        if len(view):
            batch.append(view)
            if len(batch) == IOV_MAX:
                yield batch
                batch = []
    if batch:
        yield batch


def first_batch(views):
    """The first ``IOV_MAX`` non-empty views (one ``readv`` of a stream: a short read is
    an answer, not an error); empty when ``views`` hold no byte."""
    return next(batches(views), [])


def transfer(io, fd, views, offset):
    """Move every byte of ``views`` with ``io`` (``os.preadv`` / ``os.pwritev``) at file
    ``offset``, IOV_MAX views at a time, continuing after short counts; the bytes moved
    (fewer only when ``io`` returns 0: end of file)."""
    views = list(filter(None, views))
    done = start = 0
    while start < len(views):
        batch = views[start:start + IOV_MAX]
        n = io(fd, batch, offset + done)
        if not n:
            return done
        done += n
        if n == sum(map(len, batch)):
            start += len(batch)
            continue
        for view in batch:                          # a short count: go on where it stopped
            if n < len(view):
                break
            n -= len(view)
            start += 1
        views[start] = views[start][n:]
    return done


def fill_from(readinto, views, wanted):
    """Read ``wanted`` bytes into ``views`` with ``readinto(view) -> count`` (a file
    object's); the bytes read (fewer at end of file or when ``views`` are shorter)."""
    done = 0
    for view in views:
        while done < wanted and len(view):
            n = readinto(view[:wanted - done])
            if not n:
                return done
            done += n
            view = view[n:]
        if done >= wanted:
            break
    return done


def fill_zeros(views):
    """Write zeros over every byte of ``views``."""
    for view in views:
        for start in range(0, len(view), len(_ZEROS)):
            part = view[start:start + len(_ZEROS)]
            part[:] = _ZEROS[:len(part)]


def zeros(length):
    """Views of ``length`` zero bytes (shared, read-only): a source for writes of zeros."""
    whole, rest = divmod(length, len(_ZEROS))
    views = [memoryview(_ZEROS)] * whole
    if rest:
        views.append(memoryview(_ZEROS)[:rest])
    return views
