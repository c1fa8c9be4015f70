"""Reading one TOML table key by key, each mistake a ``ConfigError`` naming file and key.

The board file is read this way (its checks span keys and tables); a VMs
config's device tables are declared as ``avatar_hw.schema.Schema``s instead.
"""

from .errors import ConfigError
from .schema import REQUIRED
_KINDS = {int: "an integer", str: "a string", dict: "a table", list: "an array"}


class Table:
    """One TOML table, read key by key with type checks; ``done()`` refuses unread keys."""

    def __init__(self, file, name, data):
        self.file, self.name, self.data, self.read = file, name, data, []

    def key(self, key):
        return f"{self.name}.{key}" if self.name else key

    def error(self, key, problem):
        return ConfigError(self.file, self.key(key) if key else self.name, problem)

    def get(self, key, kind, default=REQUIRED):
        self.read.append(key)
        if key not in self.data:
            if default is REQUIRED:
                raise self.error(key, f"missing; it must be {_KINDS[kind]}")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.error(key, f"must be {_KINDS[kind]}, not {type(value).__name__} "
                                  f"{value!r}")
        return value

    def number(self, key, default=REQUIRED, minimum=0):
        value = self.get(key, int, default)
        if value is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, not {value}")
        return value

    def choice(self, key, choices, default=REQUIRED):
        value = self.get(key, str, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(map(repr, choices))}, "
                                  f"not {value!r}")
        return value

    def table(self, key, default=REQUIRED):
        data = self.get(key, dict, default)
        return None if data is None else type(self)(self.file, self.key(key), data)

    def done(self):
        for key in self.data:
            if key not in self.read:
                what = "table" if not self.name else "key"
                raise self.error(key, f"unknown {what}; expected one of {', '.join(self.read)}")
