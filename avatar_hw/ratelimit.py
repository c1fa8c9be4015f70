"""Counted, rate-limited warnings for what an untrusted party (a guest, a stub) can repeat.

A guest must not be able to flood the log: the first ``first`` messages are
warnings, then every ``every``-th; the others go to debug. ``count`` counts
them all (for ``info``).
"""

import logging


class RateLimitedLog:
    def __init__(self, logger, *, first=20, every=1000):
        self.logger, self.first, self.every = logger, first, every
        self.count = 0

    def __call__(self, fmt, *args):
        self.count += 1
        level = (logging.WARNING if self.count <= self.first or not self.count % self.every
                 else logging.DEBUG)
        self.logger.log(level, fmt, *args)
