"""``routemqd run`` and ``routemqd retire-host``: load the manifest, set up logging, run a master.

The exit codes returned here are listed in :mod:`routemqd.exitcodes`.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys

from routemqd import log as logsetup
from routemqd.exitcodes import ExitCode
from routemqd.manifest import Manifest, ManifestError, load
from routemqd.master import AlreadyRunning, Master
from routemqd.pidfile import PidFile, PidFileError
from routemqd.plan import slots_for
from routemqd.readiness import set_title


def _load_for_daemon(manifest_path: str) -> Manifest | None:
    """Load the manifest (one message on stderr if it is invalid) and set up logging from it."""
    try:
        manifest = load(manifest_path)
    except ManifestError as e:
        sys.stderr.write(f"routemqd: {e}\n")
        return None
    logsetup.configure(manifest.logging.level, manifest.logging.format, manifest.logging.file)
    logsetup.set_secrets(manifest.secrets())
    return manifest


def retire_host(manifest_path: str, host_id: str) -> int:
    """End the sessions of a host that is gone for good: for each of its slots, a worker resumes
    the session (handling what the broker queued for it), unsubscribes, drains, and ends it."""
    manifest = _load_for_daemon(manifest_path)
    if manifest is None:
        return int(ExitCode.CONFIG)
    manifest = dataclasses.replace(manifest, host_id=host_id)
    master = Master(manifest, socket_path=os.devnull)
    master.install_signals()
    for spec in slots_for(manifest).values():
        master.table.add(spec, master.clock())
    master.log.info("retire_host_started", host_id=host_id, slots=len(master.slots))
    master.draining = True
    master.table.drain_all(master.clock())
    code = master.run()
    if master.shutting_down:
        master.log.warning("retire_host_interrupted", host_id=host_id)
        return int(ExitCode.CRASH)
    master.log.info("retire_host_done", host_id=host_id)
    return code


def preload_worker_code() -> None:
    """Import the worker's code (and so paho-mqtt) once, before the first fork, so every worker
    starts with it in memory instead of importing it again: a SIGKILLed worker's replacement is
    ready about 45 ms sooner, and the pages are shared. This loads library code only; the master
    never calls it, never talks MQTT and never imports a handler (DESIGN invariant 1). Importing
    ``routemqd.daemon`` itself stays free of paho; only ``routemqd run`` pays for it.

    Then freeze the heap: what every worker inherits is out of the garbage collector's sight, so
    no worker's collection walks it again (nor touches, and so copies, its pages)."""
    import routemqd.worker  # noqa: F401

    gc.collect()
    gc.freeze()


def run_master(
    manifest_path: str, pidfile: str | None = None, socket_path: str | None = None
) -> int:
    manifest = _load_for_daemon(manifest_path)
    if manifest is None:
        return int(ExitCode.CONFIG)
    master = Master(manifest, socket_path=socket_path)
    master.install_signals()
    set_title(f"routemqd: master {manifest.path}")
    pid = None
    if pidfile:
        try:
            pid = PidFile(pidfile)
            pid.acquire()
        except PidFileError as e:
            sys.stderr.write(f"routemqd: {e}\n")
            return int(ExitCode.CANT_CREATE)
    try:
        preload_worker_code()
        try:
            master.start_services()
        except AlreadyRunning as e:
            sys.stderr.write(f"routemqd: {e}; refusing to start a second daemon\n")
            return int(ExitCode.CANT_CREATE)
        return master.run()
    finally:
        master.stop_services()
        if pid is not None:
            pid.release()
