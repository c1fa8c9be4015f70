"""Copying between guest buffers (lists of memoryviews from a ``DescriptorChain``) and
small host buffers: request headers, control messages, status bytes.

Both copy at most the host buffer's size, whatever the chain's length (a
guest may describe gigabytes of overlapping descriptors): the cost is
bounded by ``len(out)`` / ``len(data)``, never by the chain.
"""


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
