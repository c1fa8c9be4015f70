"""A vhost-user front end (QEMU docs/interop/vhost-user.rst): hand a device's virtqueues
to a back-end process, which reads and writes guest RAM itself."""

from .frontend import Frontend, VhostUserError

__all__ = ["Frontend", "VhostUserError"]
