"""Test doubles: a fake UIO tree, the stand-in stub, a guest-side virtio driver, a QEMU qtest
client, hostile-guest moves. Imported only by tests/ and bench/ (tests/test_test_doubles.py
checks that no shipped module does); shipped HIL code is in ``avatar_hw.hil``."""
