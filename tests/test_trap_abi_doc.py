"""docs/trap-abi.md's tables and named values say what avatar_hw.abi says.

tests/test_abi_header.py ties the C header to ``avatar_hw.abi``; this ties the
document a hypervisor is written from to the same module: the field tables of
section 3 (header), 4 (slots) and 14 (shadow pages), every ``AVT_`` name the
text gives a value or a bit, the ABI version in the title and in the header
table. A value changed in the document, or in the module only, fails here.
"""

import ctypes
import re
from pathlib import Path

from avatar_hw import abi

DOC = Path(__file__).resolve().parents[1] / "docs" / "trap-abi.md"
TABLES = (("## 3. Header", abi.Header), ("## 4. Slots", abi.Slot),
          ("## 14. Register shadow", abi.Shadow))
RESERVED = {"reserved0", "reserved1", "reserved2"}
_NUMBER = r"(0x[0-9a-fA-F]+|\d+)"
_ROW = re.compile(rf"\|\s*{_NUMBER}\s*\|\s*{_NUMBER}\s*\|\s*`([a-z_0-9]+)(?:\[(\d+)\])?`"
                  r"\s*\|(.*)")
# "`AVT_X` = 0x5..", "`AVT_X` 0", "`AVT_X` (64)": a value; "bit 3 `AVT_X`", "`AVT_X` (bit 0)"
_VALUES = (re.compile(rf"`AVT_([A-Z_]+)`\s*=?\s*{_NUMBER}\b"),
           re.compile(rf"`AVT_([A-Z_]+)` \({_NUMBER}\)"))
_BITS = (re.compile(r"bit (\d+)\s+`AVT_([A-Z_]+)`"), re.compile(r"`AVT_([A-Z_]+)` \(bit (\d+)\)"))
# Every name of these kinds must be given its value in the text.
DOCUMENTED = {name for name, value in vars(abi).items()
              if name.isupper() and isinstance(value, int)
              and re.match(r"(MAGIC|MAX_SLOTS|SLOT_|SLOTS_|MODEL_|STUB_|DIR_|STATUS_|F_)", name)
              and (not name.endswith("_OFFSET") or name == "SLOTS_OFFSET")}


def section(doc, title):
    start = doc.index(title)
    end = doc.find("\n## ", start + 1)
    return doc[start:end if end > 0 else None]


def table_rows(text):
    """``(offset, size, field, count or None, rest of the row)`` of a field table."""
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            yield (int(m.group(1), 0), int(m.group(2), 0), m.group(3),
                   int(m.group(4)) if m.group(4) else None, m.group(5))


def table_mismatches(doc):
    problems = []
    for title, struct in TABLES:
        seen = set()
        for offset, size, name, count, rest in table_rows(section(doc, title)):
            seen.add(name)
            field = getattr(struct, name, None)
            if field is None:
                problems.append(f"{title}: `{name}` is not a field of abi.{struct.__name__}")
                continue
            if (offset, size) != (field.offset, field.size):
                problems.append(f"{title}: `{name}` at {offset:#x}, {size} bytes; abi.py: "
                                f"{field.offset:#x}, {field.size}")
            ctype = dict(struct._fields_)[name]
            length = getattr(ctype, "_length_", None)     # a byte array's is its size
            if length is not None and ctypes.sizeof(ctype._type_) == 1 and count is None:
                length = None
            if count != length:
                problems.append(f"{title}: `{name}` has {count} elements; abi.py: {length}")
            if struct is abi.Header and name in ("abi_major", "abi_minor"):
                value = abi.ABI_MAJOR if name == "abi_major" else abi.ABI_MINOR
                said = re.search(r"\|\s*(\d+)\b[^|]*\|\s*$", rest)
                if not said or int(said.group(1)) != value:
                    problems.append(f"{title}: `{name}` row does not say {value}")
        missing = {name for name, _ in struct._fields_} - seen - RESERVED
        if missing:
            problems.append(f"{title}: fields of abi.{struct.__name__} not in its table: "
                            f"{sorted(missing)}")
    return problems


def value_mismatches(doc):
    """Named values and bits the text gives, against abi.py; and the names it must give."""
    problems, given = [], set()
    for pattern in _VALUES:
        for m in pattern.finditer(doc):
            name, value = m.group(1), int(m.group(2), 0)
            given.add(name)
            if getattr(abi, name, None) != value:
                problems.append(f"`AVT_{name}` {value}: abi.py has {getattr(abi, name, None)}")
    for pattern in _BITS:
        for m in pattern.finditer(doc):
            bit, name = (int(m.group(1)), m.group(2)) if m.re is _BITS[0] else \
                        (int(m.group(2)), m.group(1))
            given.add(name)
            if getattr(abi, name, None) != 1 << bit:
                problems.append(f"`AVT_{name}` bit {bit}: abi.py has {getattr(abi, name, None)}")
    missing = DOCUMENTED - given
    if missing:
        problems.append(f"given no value in the text: {sorted(missing)}")
    title = re.search(r"^# The trap page ABI, version (\d+)\.(\d+)", doc, re.MULTILINE)
    if not title or (int(title.group(1)), int(title.group(2))) != (abi.ABI_MAJOR,
                                                                   abi.ABI_MINOR):
        problems.append(f"title version {title and title.groups()}: abi.py has "
                        f"{abi.ABI_MAJOR}.{abi.ABI_MINOR}")
    return problems


def mismatches(doc):
    return table_mismatches(doc) + value_mismatches(doc)


def test_the_doc_s_tables_and_values_match_the_abi_module():
    assert mismatches(DOC.read_text()) == []


def test_the_doc_checks_cover_every_table_row_and_value():
    doc = DOC.read_text()
    for title, struct in TABLES:
        rows = {row[2] for row in table_rows(section(doc, title))}
        assert rows == {name for name, _ in struct._fields_} - RESERVED, title
    assert {"SLOT_DONE", "F_RINGS_TAKEN", "SLOT_F_POSTED_WRITE", "MAX_SLOTS"} <= DOCUMENTED
    assert ctypes.sizeof(abi.Slot) == abi.SLOT_SIZE


def changed(doc, old, new):
    assert doc.count(old) == 1, old
    return doc.replace(old, new)


def test_a_value_changed_in_the_doc_is_caught():
    doc = DOC.read_text()
    cases = [
        ("| 4 | 4 | `seq` |", "| 8 | 4 | `seq` |"),                      # section 4 offset
        ("| 40 | 8 | `t_done` |", "| 40 | 4 | `t_done` |"),                # section 4 size
        ("| 32 | 8 | `counter_hz` |", "| 36 | 8 | `counter_hz` |"),        # section 3
        ("`virq_pending[8]`", "`virq_pending[4]`"),                        # element count
        ("| 0xf08 | 8 | `hits` |", "| 0xf0c | 8 | `hits` |"),              # section 14
        ("| 4 | 2 | `abi_major` | stub | init | 1 |",
         "| 4 | 2 | `abi_major` | stub | init | 2 |"),
        ("| init | 5 (1.0 had", "| init | 4 (1.0 had"),
        ("`AVT_SLOT_DONE` 2", "`AVT_SLOT_DONE` 3"),                        # a named value
        ("`AVT_MAGIC` = 0x50545641", "`AVT_MAGIC` = 0x50545642"),
        ("bit 5 `AVT_F_PACE`", "bit 6 `AVT_F_PACE`"),                      # a feature bit
        ("bit 4\n  `AVT_F_HALT_POLL`", "bit 3\n  `AVT_F_HALT_POLL`"),
        ("`AVT_SLOT_F_POSTED_WRITE` (bit 0)", "`AVT_SLOT_F_POSTED_WRITE` (bit 1)"),
        ("# The trap page ABI, version 1.", "# The trap page ABI, version 2."),
    ]
    for old, new in cases:
        assert mismatches(changed(doc, old, new)), f"not caught: {old!r} -> {new!r}"
    removed = changed(doc, "| 52 | 4 | `wfi_ran_out` |", "| 52 | 4 | wfi_ran_out |")
    assert any("wfi_ran_out" in p for p in mismatches(removed))
