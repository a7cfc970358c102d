"""Output helpers: atomic writes and run provenance."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

_VERSIONED = ("qspjax", "jax", "jaxlib", "diffrax", "equinox", "optax", "numpyro", "numpy", "scipy")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(tmp_path)`` into a temporary file in the same folder, then rename.

    A crash mid-write leaves the old file (or nothing), never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def git_revision() -> str | None:
    """The git revision of the qspjax checkout, with ``-dirty`` if it has changes; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def provenance(config: dict[str, Any] | None = None, seed: int | None = None) -> dict[str, Any]:
    """What a run needs to be reproduced: command line, seed, config, package versions, git revision."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "argv": sys.argv,
        "seed": seed,
        "config": config,
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_revision": git_revision(),
    }


def prepare_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create the output folder; refuse a non-empty existing one unless ``overwrite``."""
    from qspjax.errors import QSPValidationError

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise QSPValidationError(
            "command line", "--out", str(out), "the folder exists and is not empty; pass --overwrite to replace it"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out
