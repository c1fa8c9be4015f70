"""labgrid integration: ``AvatarStrategy`` boots the hypervisor and starts ``avatar-hw serve``.

labgrid is not a dependency: this module imports without it, and defines and
registers the strategy only when labgrid is installed (list it under
``imports:`` in the environment file). docs/labgrid.md has the exporter,
place and environment examples.

States: ``off`` -> ``hypervisor`` (power cycle, the hypervisor's banner on the
board UART) -> ``shell`` (logged in to the board's Linux) -> ``serving``
(``avatar-hw serve`` running, its control socket answering; if it exits
instead, a ``StrategyError`` carries its log's last lines at once).
``restart_daemon()`` restarts only the daemon (labgrid skips a transition to
the current state); ``force(state)`` (labgrid's ``--lg-initial-state``) takes the
board to be in that state already. The shell commands for the last step are plain
functions (``start_command``, ``ready_command``, ``stop_command``), so they are tested
without labgrid.
"""

import enum
import importlib.util
import re
import shlex

READY_TIMEOUT = 30.0
POLL = 0.2


class Status(enum.Enum):
    unknown = 0
    off = 1
    hypervisor = 2
    shell = 3
    serving = 4


def start_command(serve_args, *, log, pidfile, avatar_hw="avatar-hw"):
    """A shell command line that starts ``avatar-hw serve SERVE_ARGS`` in the background."""
    argv = " ".join(shlex.quote(a) for a in serve_args)
    return (f"nohup {avatar_hw} serve {argv} >{shlex.quote(log)} 2>&1 </dev/null & "
            f"echo $! >{shlex.quote(pidfile)}")


def ready_command(control, *, timeout=READY_TIMEOUT, avatar_hw="avatar-hw", pidfile=None,
                  log=None):
    """A shell command line that succeeds once the daemon at ``control`` answers.

    With ``pidfile`` (and ``log``) it fails as soon as the daemon started by
    ``start_command`` is gone, printing the end of its log (the daemon's one-line
    error), instead of waiting out ``timeout``."""
    tries = max(1, int(timeout / POLL))
    gone = ""
    if pidfile:
        tail = f"tail -n 5 {shlex.quote(log)} >&2; " if log else ""
        gone = (f"kill -0 $(cat {shlex.quote(pidfile)}) 2>/dev/null || "
                f"{{ echo 'avatar-hw serve exited:' >&2; {tail}exit 2; }}; ")
    return (f"(i=0; until {avatar_hw} info --control {shlex.quote(control)} >/dev/null 2>&1; "
            f"do {gone}i=$((i + 1)); [ $i -ge {tries} ] && exit 1; sleep {POLL}; done)")


def stop_command(pidfile):
    """A shell command line that stops the daemon started by ``start_command`` (SIGTERM)."""
    pidfile = shlex.quote(pidfile)
    return f"[ -f {pidfile} ] && kill $(cat {pidfile}) 2>/dev/null; rm -f {pidfile}; true"


# attrs validators. TypeError, which labgrid reports as a bad environment (a ValueError would
# be a traceback), naming the key and what it takes.

def _bad(attribute, value, wanted):
    return TypeError(f"AvatarStrategy {attribute.name}: {value!r} is not {wanted}")


def _seconds(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise _bad(attribute, value, "a number of seconds (e.g. 120)")


def _text(instance, attribute, value):
    if not isinstance(value, str) or not value:
        raise _bad(attribute, value, f"a text (e.g. {attribute.default})")


def _arguments(instance, attribute, value):
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise _bad(attribute, value, 'a list of texts (e.g. ["--board", "rpi4"]: quote numbers)')


def _regex(instance, attribute, value):
    _text(instance, attribute, value)
    try:
        re.compile(value)
    except re.error as err:
        raise _bad(attribute, value, f"a regex ({err})") from None


def _define_strategy():
    import attr
    from labgrid.factory import target_factory
    from labgrid.step import step
    from labgrid.strategy import Strategy, StrategyError, never_retry
    from pexpect import TIMEOUT

    @target_factory.reg_driver
    @attr.s(eq=False)
    class AvatarStrategy(Strategy):
        """Power, the board UART (console), the board Linux's shell; then avatar-hw serve."""

        bindings = {"power": "PowerProtocol", "console": "ConsoleProtocol",
                    "shell": "ShellDriver"}

        status = attr.ib(default=Status.unknown)
        serve_args = attr.ib(factory=lambda: ["--board", "rpi4", "--config",
                                              "/etc/avatar-hw/vms.toml"], validator=_arguments)
        control = attr.ib(default="/run/avatar-hw.sock", validator=_text)
        banner = attr.ib(default=r"Avatar", validator=_regex)
        boot_timeout = attr.ib(default=120.0, validator=_seconds)
        log = attr.ib(default="/var/log/avatar-hw.log", validator=_text)
        pidfile = attr.ib(default="/run/avatar-hw.pid", validator=_text)
        avatar_hw = attr.ib(default="avatar-hw", validator=_text)

        @step(args=["status"])
        def transition(self, status, *, step):
            status = _known(status, "transition to")
            if status == self.status:
                step.skip("nothing to do")
                return
            if status == Status.off:
                self.target.deactivate(self.console)     # the shell logs in again after
                self.target.activate(self.power)
                self.power.off()
            elif status == Status.hypervisor:
                self.transition(Status.off)
                self.target.activate(self.console)
                self.power.cycle()
                self._expect_banner()
            elif status == Status.shell:
                self.transition(Status.hypervisor)
                self._log_in()
            elif status == Status.serving:
                self.transition(Status.shell)
                self.restart_daemon()
            self.status = status

        def _expect_banner(self):
            """The hypervisor's banner on the board UART, else a StrategyError saying what to
            check (not pexpect's TIMEOUT and its spawn dump)."""
            index, before, _, _ = self.console.expect([self.banner, TIMEOUT],
                                                      timeout=self.boot_timeout)
            if index:
                output = before.decode(errors="replace")[-200:]
                raise StrategyError(
                    f"the board did not boot: no {self.banner!r} (AvatarStrategy banner) on "
                    f"the board UART within {self.boot_timeout:g} s of the power cycle; check "
                    f"its power, the UART's port and speed, and the banner; last output: "
                    f"{output!r}")

        def _log_in(self):
            """The ShellDriver logs in on the board UART, else a StrategyError saying so."""
            try:
                self.target.activate(self.shell)
            except TIMEOUT as err:
                raise StrategyError(f"the board's Linux gave no shell on the board UART: {err} "
                                    "(check the ShellDriver's prompt, login_prompt and "
                                    "username)") from None

        @never_retry
        @step(args=["status"])
        def force(self, status, *, step):
            """Take the board to be in ``status`` already (labgrid's ``--lg-initial-state``):
            activate that state's drivers, run nothing."""
            status = _known(status, "force state")
            self.target.activate(self.power)
            if status == Status.off:
                self.target.deactivate(self.console)
            elif status == Status.hypervisor:
                self.target.activate(self.console)
            else:
                self.target.activate(self.shell)
            self.status = status

        @step()
        def restart_daemon(self):
            """Stop the daemon this strategy started (if any), start it again, wait until
            it answers; StrategyError with its log's last lines if it exits instead."""
            self.shell.run_check(stop_command(self.pidfile))
            self.shell.run_check(start_command(self.serve_args, log=self.log,
                                               pidfile=self.pidfile, avatar_hw=self.avatar_hw))
            out, err, code = self.shell.run(
                ready_command(self.control, avatar_hw=self.avatar_hw, pidfile=self.pidfile,
                              log=self.log) + " 2>&1", timeout=READY_TIMEOUT + 10)
            if code:
                problem = "\n".join(out) if code == 2 else (
                    f"its control socket {self.control} did not answer within "
                    f"{READY_TIMEOUT:.0f} s")
                raise StrategyError(f"avatar-hw serve {' '.join(self.serve_args)}: {problem}")

    def _known(status, doing):
        """``status`` (a Status or its name) as a Status other than ``unknown``."""
        status = status if isinstance(status, Status) else Status[status]
        if status == Status.unknown:
            raise StrategyError(f"can not {doing} {status}")
        return status

    return AvatarStrategy


if importlib.util.find_spec("labgrid") is not None:
    AvatarStrategy = _define_strategy()
