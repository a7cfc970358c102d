"""Output helpers: atomic writes and run provenance."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

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
        if tmp_path.exists():  # mkstemp makes it owner-only: give it the mode a plain open() would
            os.chmod(tmp_path, _new_file_mode(path))
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def _new_file_mode(path: Path) -> int:
    """The existing file's permissions, else 0o666 less the process umask (what open() gives)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


# Reasons written beside a key whose value had to become null (``<key>_null_reason``).
NOT_REACHED = "not reached"
NOT_FINITE = "not finite"


def atomic_write_json(path: str | os.PathLike, obj: Any, null_reasons: Mapping[str, str] | None = None) -> Path:
    """Write ``obj`` as strict JSON (RFC 8259: no ``NaN``/``Infinity`` tokens), atomically.

    Non-finite floats (Python or numpy, nested anywhere) become ``null`` and the dict holding
    them gains ``<key>_null_reason`` beside the key (see :func:`strict_json_obj`);
    ``null_reasons`` maps key names to a better reason where the caller knows it (e.g. a median
    survival that is not reached).
    """
    return atomic_write_text(path, strict_json_dumps(obj, null_reasons) + "\n")


def strict_json_dumps(obj: Any, null_reasons: Mapping[str, str] | None = None, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict_json_obj` with ``allow_nan=False`` (indent 2 by default)."""
    kwargs.setdefault("indent", 2)
    return json.dumps(strict_json_obj(obj, null_reasons), allow_nan=False, **kwargs)


def strict_json_obj(obj: Any, null_reasons: Mapping[str, str] | None = None) -> Any:
    """``obj`` as plain JSON values with every non-finite float replaced by ``None``.

    numpy scalars and arrays become Python numbers and lists, tuples lists, paths strings. For
    each dict key whose value is, or holds, a non-finite float, ``<key>_null_reason`` is added
    beside it (unless the dict already has one): ``null_reasons[key]`` for the key or, failing
    that, the nearest enclosing key that has one; else ``"not reached"`` for a ``+inf`` under a
    key naming a median (a Kaplan–Meier median that the curve never reaches); else ``"not finite"`` with what was there (``nan``, ``inf``, ``-inf``)
    and, inside a list, where (e.g. ``"not finite: inf at [1]"``). A non-finite float that is
    not under any dict key (a bare number or a list at the top) becomes ``null`` without a reason.
    """
    reasons = dict(null_reasons or {})
    value, _ = _strict(obj, reasons, keys=())
    return value


def _strict(obj: Any, reasons: dict[str, str], keys: tuple[str, ...]) -> tuple[Any, list[tuple[str, str]]]:
    """(converted value, [(index path, kind)] of the non-finite floats found in it)."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj, []
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj, []
        return None, [("", "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))]
    if isinstance(obj, Path):
        return str(obj), []
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                if isinstance(k, (np.generic,)):
                    k = k.item()
                if isinstance(k, float) and not math.isfinite(k):
                    raise ValueError(f"cannot write the non-finite dict key {k!r} as JSON")
                k = k if isinstance(k, str) else json.dumps(k)  # what json.dumps does with int/float keys
            out[k], bad = _strict(v, reasons, keys=keys + (k,))
            reason_key = f"{k}_null_reason"
            if bad and reason_key not in obj and reason_key not in out:
                out[reason_key] = _reason(keys + (k,), bad, reasons)
        return out, []
    if isinstance(obj, (list, tuple)):
        items, found = [], []
        for i, v in enumerate(obj):
            conv, bad = _strict(v, reasons, keys=keys)
            items.append(conv)
            found.extend((f"[{i}]{where}", kind) for where, kind in bad)
        return items, found
    if isinstance(obj, (set, frozenset)):
        return _strict(sorted(obj), reasons, keys)
    where = "/".join(keys) or "the top level"
    raise TypeError(f"cannot write {type(obj).__name__} as JSON (at {where})")


def _reason(keys: tuple[str, ...], bad: list[tuple[str, str]], reasons: Mapping[str, str]) -> str:
    """The reason for the innermost key in ``keys``; the nearest enclosing key decides."""
    for k in reversed(keys):
        if k in reasons:
            return reasons[k]
    kinds = sorted({kind for _, kind in bad})
    if kinds == ["inf"] and any("median" in k for k in keys):
        return NOT_REACHED
    if len(bad) == 1:
        where, kind = bad[0]
        return f"{NOT_FINITE}: {kind}" + (f" at {where}" if where else "")
    return f"{NOT_FINITE}: {len(bad)} values ({', '.join(kinds)})"


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
