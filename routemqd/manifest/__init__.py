"""Load ``/etc/routemq.yaml`` into frozen dataclasses, or fail naming file:line and field.

The manifest is the only thing operators edit, usually in a hurry and over SSH, so every error must
point at the exact line and key. We therefore never use ``yaml.safe_load``: we compose the YAML into
nodes (which keep their positions) and build the dataclasses ourselves while walking them. Only the
safe node types are accepted (no ``!!python/...`` tags), the node walk is bounded (alias bombs), and
unknown keys are errors with a "did you mean" hint because a misspelt ``max_memroy`` silently
ignored is a limit that never applies.
"""

from __future__ import annotations

import os
import stat

from routemqd.manifest.model import (
    DEFAULT_CONTROL_SOCKET,
    MAX_MANIFEST_BYTES,
    BrokerConfig,
    ControlConfig,
    HookRef,
    LoggingConfig,
    Manifest,
    MetricsConfig,
    Route,
    RouteSettings,
    Scaling,
    ScalingKnobs,
    Secret,
    SupervisorConfig,
    TLSConfig,
)
from routemqd.manifest.nodes import MAX_NODES, Ctx, ManifestError, compose
from routemqd.manifest.sections import build


def load(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Manifest:
    """Read and validate a manifest file. Raises ManifestError, never anything else."""
    p = str(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(p, None, "", "not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                p, None, "", f"file is {st.st_size} bytes; a manifest may be at most 1 MiB"
            )
        with open(p, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except ManifestError:
        raise
    except OSError as e:
        raise ManifestError(p, None, "", f"cannot read: {e.strerror or e}") from None
    return loads(data, p, environ=environ, world_readable=_world_readable(p))


def _world_readable(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return False


def loads(
    data: bytes | str,
    path: str = "<manifest>",
    environ: dict[str, str] | None = None,
    world_readable: bool = False,
) -> Manifest:
    """Validate manifest text. ``path`` is only used in messages and to resolve relative paths."""
    env = dict(os.environ) if environ is None else environ
    if isinstance(data, bytes) and len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(path, None, "", "a manifest may be at most 1 MiB")
    try:
        root = compose(data)
    except ManifestError as e:
        raise ManifestError(path, e.line, e.field, e.problem) from None
    ctx = Ctx(path=path, env=env)
    try:
        return build(ctx, root, world_readable)
    except RecursionError:
        raise ManifestError(path, None, "", "the document is nested too deeply") from None


__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "MAX_MANIFEST_BYTES",
    "MAX_NODES",
    "BrokerConfig",
    "ControlConfig",
    "HookRef",
    "LoggingConfig",
    "Manifest",
    "ManifestError",
    "MetricsConfig",
    "Route",
    "RouteSettings",
    "Scaling",
    "ScalingKnobs",
    "Secret",
    "SupervisorConfig",
    "TLSConfig",
    "load",
    "loads",
]
