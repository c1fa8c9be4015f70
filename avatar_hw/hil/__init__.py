"""Hardware-in-the-loop testing shipped with avatar-hw: a guest's console driven expect-style
(``console``), the board a test runs against (``target``), the pytest plugin
(``pytest_plugin``, entry point ``pytest11``) and labgrid's ``AvatarStrategy`` (``labgrid``)."""
