"""Test helpers: QEMU qtest client and fixtures shared by the test suites."""
