"""Host endpoints of a console port, one module per URL scheme (pyserial's URL handlers).

    open_endpoint("pty:/run/avatar/vm0-console")   a pseudo-terminal; the path is a stable
                                                   symlink to /dev/pts/N
    open_endpoint("unix:/run/avatar/vm0.sock")     a Unix socket server (one client)
    open_endpoint("tcp:127.0.0.1:4555")            a TCP server; "tcp:4555" listens on
                                                   loopback only
    open_endpoint("rfc2217:127.0.0.1:4560")        an RFC 2217 (Telnet COM port) server
    open_endpoint("file:/var/log/avatar/vm0.log")  append-only log (output only)
    open_endpoint("stdio")                         this process's stdin/stdout

The scheme names its module: ``avatar_hw.endpoints.<scheme>``, whose
``open_url(url, rest, limit)`` returns the endpoint (``rest`` is the URL after
``scheme:``) and ``pyserial_url(rest)`` the pyserial URL a client attaches with
(None: not attachable). A new scheme is one module plus its name in ``SCHEMES``.
``avatar_hw.backends.console`` fans a port's output out to its endpoints.
"""

import importlib
import os
from pathlib import Path

from ..errors import ConfigError

SCHEMES = ("pty", "unix", "tcp", "file", "stdio", "rfc2217")
PATH_SCHEMES = ("file", "pty", "unix")      # the rest of the URL is a path
DEFAULT_LIMIT = 256 * 1024      # bytes of output an endpoint used on its own holds


def open_endpoint(url, *, limit=DEFAULT_LIMIT):
    """One endpoint from a URL (see the module docstring). A relative path is taken from the
    working directory and the endpoint's ``url`` names it in full: what ``info`` reports is
    what a client elsewhere (``avatar-hw console``, the pytest plugin) opens."""
    url = url_under(url, os.getcwd())
    scheme, _, rest = url.partition(":")
    if scheme not in SCHEMES:
        raise ConfigError(url, None, f"unknown console endpoint {scheme!r}; use one of "
                          + ", ".join(f"{s}:" for s in SCHEMES))
    return importlib.import_module(f".{scheme}", __name__).open_url(url, rest, limit)


def check_url(url):
    """Raise ValueError unless ``url`` looks like an endpoint URL (the scheme is checked when
    it is opened)."""
    if not isinstance(url, str) or not url:
        raise ValueError("must be a URL or a non-empty list of URLs such as "
                         "\"pty:/run/avatar/vm0\"")
    if ":" not in url and url != "stdio":
        raise ValueError(f"{url!r} is not a URL (scheme:rest, e.g. file:/var/log/avatar/vm0.log)")


def url_under(url, base):
    """``url`` with a relative path put under ``base`` (schemes whose rest is a path)."""
    scheme, sep, rest = url.partition(":")
    if sep and scheme in PATH_SCHEMES and rest and not Path(rest).is_absolute():
        return f"{scheme}:{Path(base, rest)}"
    return url


def pyserial_url(url):
    """The pyserial URL a client uses for endpoint ``url`` (None: not attachable).

    ``pty:/run/vm0`` -> ``/run/vm0``; ``tcp:4555`` -> ``socket://127.0.0.1:4555``;
    ``rfc2217:0.0.0.0:4560`` -> ``rfc2217://127.0.0.1:4560``; ``unix:/x`` -> ``unix:///x``.
    """
    scheme, _, rest = url.partition(":")
    if scheme not in SCHEMES:
        return None
    return importlib.import_module(f".{scheme}", __name__).pyserial_url(rest)
