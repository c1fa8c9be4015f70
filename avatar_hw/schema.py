"""Config tables read field by field: each field's type, default, check and help in one place.

A device module declares its keys as ``Field``s in a ``Schema``; ``Schema.read``
checks one TOML table against it and gives the options. Every mistake is one
``ConfigError`` line naming the file, the key and the problem::

    vms.toml: vm.1.block.readonly: must be true or false, not str 'no'

A field's ``check(value)`` raises ``ValueError(problem)`` for a value of the
right type that is still wrong; device constructors call the same checks, so a
rule is written once, next to its field.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

REQUIRED = object()
TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
              dict: "a table"}


@dataclass(frozen=True)
class Field:
    name: str
    kind: type | tuple          # accepted Python type(s) after TOML parsing
    default: object = None      # REQUIRED: must be given; None: left out unless given
    help: str = ""              # what the value must be: "a string (up to 20 bytes)"
    check: object = None        # check(value): raises ValueError(problem) if it is wrong
    path: object = None         # path(value, base) -> value with relative paths under base
    alias: str = None           # a former name, still read (with a deprecation warning)

    @property
    def what(self):
        return self.help or TYPE_NAMES[self.kind]

    def type_ok(self, value):
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


@dataclass(frozen=True)
class Schema:
    what: str                   # for messages: "console" in "unknown key for a console"
    fields: tuple               # of Field
    one_of: tuple = ()          # exactly one of these keys must be given

    def names(self):
        return [field.name for field in self.fields]

    def read(self, file, key, table, base=None):
        """The options of ``table`` (a key -> value dict) found at ``key`` of ``file``;
        relative paths are put under ``base`` when given."""
        if not isinstance(table, dict):
            raise ConfigError(file, key, f"must be a table such as {{ {self.fields[0].name} = "
                                         "... }}")
        table, spelled = self._renamed(file, key, table)
        unknown = sorted(set(table) - set(self.names()))
        if unknown:
            raise ConfigError(file, f"{key}.{unknown[0]}",
                              f"unknown key for a {self.what}; expected one of "
                              f"{', '.join(self.names())}")
        if self.one_of and sum(k in table for k in self.one_of) != 1:
            raise ConfigError(file, key, f"needs exactly one of {' or '.join(self.one_of)}")
        options = {}
        for field in self.fields:
            where = f"{key}.{spelled.get(field.name, field.name)}"
            if field.name not in table:
                if field.default is REQUIRED:
                    raise ConfigError(file, where, f"missing; it must be {field.what}")
                if field.default is not None:
                    options[field.name] = field.default
                continue
            value = table[field.name]
            if not field.type_ok(value):
                raise ConfigError(file, where, f"must be {field.what}, not "
                                               f"{type(value).__name__} {value!r}")
            if field.check is not None:
                try:
                    field.check(value)
                except ValueError as err:
                    raise ConfigError(file, where, str(err)) from None
            options[field.name] = (field.path(value, base) if field.path and base is not None
                                   else value)
        return options

    def _renamed(self, file, key, table):
        """``table`` with former key names read as the current ones (one warning each), and
        {current name: name the file used} for messages."""
        spelled = {}
        for field in self.fields:
            if field.alias is None or field.alias not in table:
                continue
            if field.name in table:
                raise ConfigError(file, f"{key}.{field.alias}",
                                  f"give {field.name} only ({field.alias} is its former name)")
            log.warning("%s: %s.%s is now called %s; please rename it", file, key,
                        field.alias, field.name)
            table = {(field.name if k == field.alias else k): v for k, v in table.items()}
            spelled[field.name] = field.alias
        return table, spelled


# -- checks and path rules shared by device fields --------------------------------------------

def positive(value):
    if value <= 0:
        raise ValueError(f"must be positive, not {value}")


def under(path, base):
    """``path`` relative to ``base`` unless absolute."""
    return str(Path(base, path)) if path and not Path(path).is_absolute() else path
