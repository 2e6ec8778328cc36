"""Every exit code routemqd uses, named once: the commands', the master's and the workers'.

The command line's help text and the README's list are written from this table.

Workers exit with named codes so the master can tell a crash from a boot failure without parsing
logs.

A boot failure (the handler does not import, the broker refuses our credentials) will fail the
same way on every restart, so the master parks the slot in ``failed`` at once instead of burning
through its backoff schedule. Values stay clear of 1 (Python's generic error), 2 (argparse), 9
(the test suite's handlers ``os._exit(9)`` for a plain crash) and of 128+N (killed by signal N as
a shell reports it).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CRASH = 1  # an unexpected exception escaped the worker
    HANDLER_IMPORT_FAILED = 3
    HANDLER_INVALID = 4  # imported, but not callable with one message argument
    BROKER_AUTH_REFUSED = 5
    SUBSCRIBE_REFUSED = 6
    TLS_FAILED = 7
    PARENT_GONE = 8
    SETUP_FAILED = 11  # the route's setup hook raised or passed setup_timeout
    TEARDOWN_TIMEOUT = 12  # teardown passed teardown_timeout; the work was done, the hook hung
    UNAVAILABLE = 69  # EX_UNAVAILABLE: a control command found no daemon
    CANT_CREATE = 73  # EX_CANTCREAT: another daemon holds the control socket or the pidfile
    NO_PERMISSION = 77  # EX_NOPERM: the control socket refused us
    CONFIG = 78  # EX_CONFIG from sysexits.h: the manifest is invalid

    @property
    def is_boot_failure(self) -> bool:
        """Failures that no amount of immediate restarting will fix."""
        return self in _BOOT_FAILURES


_BOOT_FAILURES = frozenset(
    {
        ExitCode.HANDLER_IMPORT_FAILED,
        ExitCode.HANDLER_INVALID,
        ExitCode.BROKER_AUTH_REFUSED,
        ExitCode.SUBSCRIBE_REFUSED,
        ExitCode.TLS_FAILED,
        ExitCode.SETUP_FAILED,
        ExitCode.CONFIG,
    }
)


def describe(status: int) -> str:
    """Name an exit status for logs: ``handler_import_failed``, ``exit 42`` ..."""
    try:
        return ExitCode(status).name.lower()
    except ValueError:
        return f"exit {status}"


# What the command line reports, for ``routemqd --help``.
COMMAND_CODES: tuple[tuple[ExitCode, str], ...] = (
    (ExitCode.OK, "ok"),
    (ExitCode.CRASH, "the command failed (a reload refused, a worker crashed)"),
    (ExitCode.UNAVAILABLE, "daemon not running"),
    (ExitCode.CANT_CREATE, "another daemon already runs with this control socket or pidfile"),
    (ExitCode.NO_PERMISSION, "permission denied on the control socket"),
    (ExitCode.CONFIG, "invalid manifest or handler"),
)


def command_help() -> str:
    return "exit codes: " + ", ".join(f"{int(c)} {text}" for c, text in COMMAND_CODES) + "."
