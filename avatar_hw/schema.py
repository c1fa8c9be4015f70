"""TOML tables read field by field: each field's type, default, check and help in one place.

The one reader of config tables: a device module declares its keys as ``Field``s
in a ``Schema`` (the VMs config), and the board file is a ``Schema`` of tables
(``board.BOARD``). ``Schema.read`` checks one TOML table against it and gives the
options. Every mistake is one ``ConfigError`` line naming the file, the key and
the problem::

    vms.toml: vm.1.block.readonly: must be true or false, not str 'no'

A field's ``check(value)`` raises ``ValueError(problem)`` for a value of the
right type that is still wrong (``EntryError`` names the entry of a list);
device constructors call the same checks, so a rule is written once, next to
its field. A field whose kind is a ``Schema`` is a table read with it. Checks
that span keys (or tables) are made by the reader's caller on the options.
"""

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

REQUIRED = object()
TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
              dict: "a table"}


def read_toml(path, what, hint=None):
    """The tables of TOML file ``path`` (a ``what``: "board file", ...); ``ConfigError``
    naming it when it is missing (with ``hint()`` added), unreadable or not TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, None, f"no such {what}" + (f"; {hint()}" if hint else "")
                          ) from None
    except OSError as err:
        raise ConfigError(path, None, f"cannot read: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(path, None, f"not a TOML file: {err}") from None


class EntryError(ValueError):
    """A check's problem with entry ``index`` of a list: the message names ``key[index]``."""

    def __init__(self, index, problem):
        super().__init__(problem)
        self.index = index


@dataclass(frozen=True)
class Field:
    name: str
    kind: object                # accepted Python type(s) after TOML parsing, or a Schema
    default: object = None      # REQUIRED: must be given; None: left out unless given
    help: str = ""              # what the value must be: "a string (up to 20 bytes)"
    check: object = None        # check(value): raises ValueError(problem) if it is wrong
    path: object = None         # path(value, base) -> value with relative paths under base
    alias: str = None           # a former name, still read (with a deprecation warning)
    only_with: str = None       # a key of the schema's one_of this field goes with

    @property
    def what(self):
        if self.help:
            return self.help
        return "a table" if isinstance(self.kind, Schema) else TYPE_NAMES[self.kind]

    def type_ok(self, value):
        if isinstance(self.kind, Schema):
            return isinstance(value, dict)
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def _has_nul(value):
    """Whether a string in ``value`` (a string, or a list or table of them) holds NUL: the
    OS cuts a path there, or refuses it, and an error would come late, from deep inside."""
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


def _join(key, name):
    return f"{key}.{name}" if key else name


def _missing(file, where, field):
    return ConfigError(file, where, f"missing; it must be {field.what}")


@dataclass(frozen=True)
class Schema:
    noun: str                   # for messages: "console" in "unknown key for a console"; or ""
    fields: tuple               # of Field
    one_of: tuple = ()          # exactly one of these keys must be given

    def names(self):
        return [field.name for field in self.fields]

    def field(self, name):
        return next(field for field in self.fields if field.name == name)

    def missing(self, file, key, name):
        """The error for field ``name`` of the table at ``key`` left out."""
        return _missing(file, _join(key, name), self.field(name))

    def read(self, file, key, table, base=None):
        """The options of ``table`` (a key -> value dict) found at ``key`` of ``file`` (""
        for the file's top level); relative paths are put under ``base`` when given."""
        if not isinstance(table, dict):
            raise ConfigError(file, key, f"must be a table such as {{ {self.fields[0].name} = "
                                         f"... }}, not {type(table).__name__} {table!r}")
        table, spelled = self._renamed(file, key, table)
        if self.one_of and sum(k in table for k in self.one_of) != 1:
            choices = "; ".join(f"{k}: {self.field(k).what}" for k in self.one_of)
            raise ConfigError(file, key, f"needs exactly one of {' or '.join(self.one_of)} "
                                         f"({choices})")
        fields = [f for f in self.fields if self._applies(f, table)]
        unknown = [k for k in table if k not in {f.name for f in fields}]
        if unknown:
            entry = "key" if key else "table"       # a file's top-level keys are tables
            of = f" for a {self.noun}" if self.noun else ""
            raise ConfigError(file, _join(key, unknown[0]),
                              f"unknown {entry}{of}; expected one of "
                              f"{', '.join(f.name for f in fields)}")
        options = {}
        for field in fields:
            where = _join(key, spelled.get(field.name, field.name))
            if field.name not in table:
                if field.default is REQUIRED:
                    raise _missing(file, where, field)
                if isinstance(field.kind, Schema) and field.default is not None:
                    options[field.name] = field.kind.read(file, where, field.default, base)
                elif field.default is not None:
                    options[field.name] = field.default
                continue
            value = table[field.name]
            if isinstance(field.kind, Schema):
                options[field.name] = field.kind.read(file, where, value, base)
                continue
            if not field.type_ok(value):
                raise ConfigError(file, where, f"must be {field.what}, not "
                                               f"{type(value).__name__} {value!r}")
            if field.path and value == "":
                raise ConfigError(file, where, f"must be {field.what}, not empty")
            if _has_nul(value):
                raise ConfigError(file, where, "contains a NUL character (\\u0000), which no "
                                               "path, URL or name can hold")
            if field.check is not None:
                try:
                    field.check(value)
                except EntryError as err:
                    raise ConfigError(file, f"{where}[{err.index}]", str(err)) from None
                except ValueError as err:
                    raise ConfigError(file, where, str(err)) from None
            options[field.name] = (field.path(value, base) if field.path and base is not None
                                   else value)
        return options

    def _applies(self, field, table):
        """Whether ``field`` may be given in ``table``: not another one_of key's, or a field
        that goes only with a one_of key the table does not give."""
        chosen = next((k for k in self.one_of if k in table), None)
        if field.name in self.one_of:
            return chosen in (None, field.name)
        return field.only_with is None or field.only_with == chosen

    def _renamed(self, file, key, table):
        """``table`` with former key names read as the current ones (one warning each), and
        {current name: name the file used} for messages."""
        spelled = {}
        for field in self.fields:
            if field.alias is None or field.alias not in table:
                continue
            if field.name in table:
                raise ConfigError(file, _join(key, field.alias),
                                  f"give {field.name} only ({field.alias} is its former name)")
            log.warning("%s: %s is now called %s; please rename it", file,
                        _join(key, field.alias), field.name)
            table = {(field.name if k == field.alias else k): v for k, v in table.items()}
            spelled[field.name] = field.alias
        return table, spelled


# -- checks and path rules shared by fields ----------------------------------------------------

def positive(value):
    if value <= 0:
        raise ValueError(f"must be positive, not {value}")


def up_to(maximum, unit=""):
    """A check: the value is positive and at most ``maximum`` (``unit``: how the message
    shows it too, e.g. "64 MiB")."""
    def check(value):
        positive(value)
        if value > maximum:
            shown = f"{maximum} ({unit})" if unit else str(maximum)
            raise ValueError(f"must be at most {shown}, not {value}")
    return check


def at_least(minimum):
    """A check: the value is ``minimum`` or more."""
    def check(value):
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, not {value}")
    return check


def between(minimum, maximum):
    """A check: the value is ``minimum`` to ``maximum``."""
    def check(value):
        if not minimum <= value <= maximum:
            raise ValueError(f"must be {minimum} to {maximum}, not {value}")
    return check


def choice(*values):
    """A check: the value is one of ``values``."""
    def check(value):
        if value not in values:
            raise ValueError(f"must be one of {', '.join(map(repr, values))}, not {value!r}")
    return check


def under(path, base):
    """``path`` relative to ``base`` unless absolute."""
    return str(Path(base, path)) if path and not Path(path).is_absolute() else path
