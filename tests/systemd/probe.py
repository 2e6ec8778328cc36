"""A handler that exercises what a sandbox could break, run by `make systemd-test`.

Each message's payload is an id. The handler appends it to /var/lib/app/seen.txt (a directory
opened by a ReadWritePaths= drop-in) and, on the first message of each worker, writes what it
found to $STATE_DIRECTORY/probe-PID.json: a ctypes callback through libffi (MemoryDenyWriteExecute),
numpy (OpenBLAS threads, SystemCallFilter), a TLS context, and whether other paths are read-only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import ssl
from typing import Any

SEEN = "/var/lib/app/seen.txt"
_probed = False


def _ctypes_callback() -> list[int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    compare = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)
    )(lambda a, b: a[0] - b[0])
    values = (ctypes.c_int * 5)(5, 1, 4, 2, 3)
    libc.qsort(values, len(values), ctypes.sizeof(ctypes.c_int), compare)
    return list(values)


def _numpy() -> float:
    import numpy

    a = numpy.arange(256.0).reshape(16, 16)
    return float((a @ a.T).trace())


def _tls() -> str:
    ctx = ssl.create_default_context()
    return ssl.OPENSSL_VERSION if ctx.verify_mode == ssl.CERT_REQUIRED else "no verify"


def _write_elsewhere() -> str:
    try:
        with open("/opt/app/not-allowed.txt", "a"):
            return "writable"
    except OSError as e:
        return e.strerror or str(e)


def _probe() -> dict[str, Any]:
    result: dict[str, Any] = {"pid": os.getpid()}
    for name, check in (
        ("ctypes", _ctypes_callback),
        ("numpy", _numpy),
        ("tls", _tls),
        ("elsewhere", _write_elsewhere),
    ):
        try:
            result[name] = check()
        except Exception as e:
            result[name] = f"FAILED {type(e).__name__}: {e}"
    return result


def handle(message: Any) -> None:
    global _probed
    if not _probed:
        _probed = True
        state = os.environ.get("STATE_DIRECTORY", "/var/lib/routemqd")
        with open(os.path.join(state, f"probe-{os.getpid()}.json"), "w") as f:
            json.dump(_probe(), f)
    with open(SEEN, "a") as f:
        f.write(message.payload.decode() + "\n")
