"""Command line: ``routemqd run | check | status | reload | restart | stop``.

Exit codes are listed once, in :mod:`routemqd.exitcodes` (``--help`` prints them from there).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from routemqd import __version__
from routemqd.exitcodes import ExitCode, command_help
from routemqd.manifest import ManifestError, load
from routemqd.signals import MASTER_SIGNALS

DEFAULT_MANIFEST = "/etc/routemq.yaml"

_EPILOG = """\
commands:
  run       start the master in the foreground (systemd runs this)
  check     validate the manifest, import handlers in a child process, print the plan
  status    show the daemon and every slot (via the control socket)
  reload    re-read the manifest and apply only what changed (same as SIGHUP)
  restart   rolling restart of every slot, or of the named routes, keeping sessions
  stop      graceful stop (same as SIGTERM); --retire ends the sessions too
  retire-host  end the sessions of a host that is gone for good
  worker    run one slot's worker alone, to debug a handler

{exit_codes}
docs: README.md, or `routemqd check -c FILE` to see what a manifest means.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="routemqd",
        description="Supervisor daemon for MQTT worker pools.",
        epilog=_EPILOG.format(exit_codes=command_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"routemqd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def manifest_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "-c",
            "--config",
            default=os.environ.get("ROUTEMQD_CONFIG", DEFAULT_MANIFEST),
            metavar="FILE",
            help=f"route manifest (default: $ROUTEMQD_CONFIG or {DEFAULT_MANIFEST})",
        )

    run = sub.add_parser("run", help="run the master in the foreground")
    manifest_arg(run)
    run.add_argument("--pidfile", metavar="PATH", help="write the master's PID here")
    run.add_argument("--socket", metavar="PATH", help="control socket (overrides the manifest)")

    check = sub.add_parser("check", help="validate the manifest and print the plan")
    manifest_arg(check)

    for name, text in (
        ("status", "show the daemon and every slot"),
        ("reload", "re-read the manifest (like SIGHUP)"),
        ("restart", "rolling restart keeping sessions"),
        ("stop", "graceful stop (like SIGTERM)"),
    ):
        sp = sub.add_parser(name, help=text)
        manifest_arg(sp)
        sp.add_argument("--socket", metavar="PATH", help="control socket (default: the manifest's)")
        if name == "status":
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "restart":
            sp.add_argument("routes", nargs="*", metavar="ROUTE", help="only these routes")
        if name == "stop":
            sp.add_argument(
                "--retire",
                action="store_true",
                help="end every slot's session instead of keeping it (this host leaves for good)",
            )

    retire = sub.add_parser(
        "retire-host",
        help="end the sessions of a host that is gone for good",
        description="Resume each session of HOST_ID (handling what the broker queued for it), "
        "unsubscribe, drain, and end it. Run on a surviving host with the same manifest after "
        "a host was removed without a retiring stop, so its share is not stranded.",
    )
    manifest_arg(retire)
    retire.add_argument("host_id", metavar="HOST_ID")

    worker = sub.add_parser(
        "worker",
        help="run one slot's worker alone, without a master (to debug a handler)",
        description="Run the worker of one slot in the foreground, exactly as the master would "
        "fork it, without a master: to debug a handler against the real broker. It takes over "
        "that slot's session, so do not run it next to a daemon that runs the same slot.",
    )
    manifest_arg(worker)
    worker.add_argument("--route", required=True, help="route name")
    worker.add_argument("--slot", type=int, default=0, help="slot index (default 0)")
    worker.add_argument(
        "--status-fd",
        type=int,
        default=1,
        metavar="FD",
        help="where status events go, one JSON line each (default: stdout)",
    )
    worker.add_argument("--command-fd", type=int, metavar="FD", help="read commands from FD")
    worker.add_argument("--hold", action="store_true", help="wait for a connect command")
    return p


def _load_or_exit(path: str) -> object:
    try:
        return load(path)
    except ManifestError as e:
        sys.stderr.write(f"routemqd: {e}\n")
        raise SystemExit(int(ExitCode.CONFIG)) from None


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["run"]:
        # Hold the master's signals from the first instant: one that arrives while we are still
        # importing waits in the kernel and is handled once the loop's handlers are installed.
        signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    if args.command == "check":
        from routemqd.check import run_check

        manifest = _load_or_exit(args.config)
        return run_check(manifest, sys.stdout, sys.stderr)  # type: ignore[arg-type]
    if args.command == "run":
        from routemqd.daemon import run_master

        return run_master(args.config, pidfile=args.pidfile, socket_path=args.socket)
    if args.command == "worker":
        return _worker(args)
    if args.command == "retire-host":
        from routemqd.daemon import retire_host

        return retire_host(args.config, args.host_id)
    from routemqd.control import client_main

    return client_main(args)


def _worker(args: argparse.Namespace) -> int:
    """Run one slot's worker directly, without a master: for tests and debugging a handler."""
    from routemqd import log
    from routemqd.plan import slots_for
    from routemqd.worker import run

    manifest = _load_or_exit(args.config)
    log.configure(manifest.logging.level, manifest.logging.format)  # type: ignore[attr-defined]
    log.set_secrets(manifest.secrets())  # type: ignore[attr-defined]
    spec = slots_for(manifest).get((args.route, args.slot))  # type: ignore[arg-type]
    if spec is None:
        sys.stderr.write(f"routemqd: no slot {args.route}[{args.slot}] in {args.config}\n")
        return int(ExitCode.CONFIG)
    return run(spec, args.status_fd, args.command_fd, hold=args.hold, parent_pid=None)


if __name__ == "__main__":
    raise SystemExit(main())
