"""Counted, rate-limited warnings for what an untrusted party (a guest, a stub) can repeat.

A guest must not be able to flood the log: the first ``first`` messages go out
at ``level`` (a warning by default), then every ``every``-th; the others go to
debug. ``count`` counts them all, ``suppressed`` those sent to debug (both for
``info``).
"""

import logging


class RateLimitedLog:
    def __init__(self, logger, *, first=20, every=1000, level=logging.WARNING):
        self.logger, self.first, self.every, self.level = logger, first, every, level
        self.count = self.suppressed = 0

    def __call__(self, fmt, *args, exc_info=False):
        self.count += 1
        if self.count <= self.first or not self.count % self.every:
            self.logger.log(self.level, fmt, *args, exc_info=exc_info)
        else:
            self.suppressed += 1
            self.logger.debug(fmt, *args, exc_info=exc_info)
