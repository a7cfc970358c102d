"""Atomic outputs: a writer that dies or fails half-way never leaves a partial file under the
final name, and an existing file survives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from qspjax.io import atomic_write, atomic_write_json, prepare_out_dir
from qspjax.errors import QSPValidationError

from conftest import REPO

# A child that writes 1 MiB chunks through atomic_write, says when the first chunk is on disk,
# then keeps going slowly enough to be killed in the middle.
_WRITER = textwrap.dedent("""
    import sys, time
    from qspjax.io import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            for i in range(10_000):
                f.write(b"x" * (1 << 20))
                f.flush()
                if i == 0:
                    print(tmp, flush=True)
                time.sleep(0.01)

    atomic_write(sys.argv[1], write)
""")


def _kill_writer_mid_write(dest) -> str:
    """Start the writer on ``dest``, SIGKILL it after its first chunk; returns its temporary path."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(dest)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        tmp = proc.stdout.readline().strip()
        assert tmp, "the writer did not start"
        assert os.path.getsize(tmp) >= 1 << 20  # it is mid-write: data on disk, not finished
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return tmp


def test_a_writer_killed_mid_write_leaves_no_file_under_the_final_name(tmp_path):
    dest = tmp_path / "trajectories.nc"
    tmp = _kill_writer_mid_write(dest)
    assert not dest.exists()
    # SIGKILL allows no clean-up; what remains is a hidden temporary in the same folder.
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers == [os.path.basename(tmp)]
    assert leftovers[0].startswith(".trajectories.nc.") and leftovers[0].endswith(".tmp")


def test_a_writer_killed_mid_write_leaves_the_previous_file_intact(tmp_path):
    dest = tmp_path / "summary.json"
    atomic_write_json(dest, {"n_patients": 4})
    _kill_writer_mid_write(dest)
    assert dest.read_text() == '{\n  "n_patients": 4\n}\n'


@pytest.mark.parametrize("existing", [False, True])
def test_a_write_that_raises_half_way_leaves_nothing_partial_and_no_temporary(tmp_path, existing):
    dest = tmp_path / "summary.json"
    if existing:
        dest.write_text("previous run")

    def write(path):
        path.write_text("half of the ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(dest, write)
    assert [p.name for p in tmp_path.iterdir()] == (["summary.json"] if existing else [])
    if existing:
        assert dest.read_text() == "previous run"


def test_a_completed_write_appears_whole_under_the_final_name(tmp_path):
    dest = tmp_path / "sub" / "run.json"
    atomic_write_json(dest, {"seed": 3, "values": list(range(5))})
    assert dest.read_text() == '{\n  "seed": 3,\n  "values": [\n    0,\n    1,\n    2,\n    3,\n    4\n  ]\n}\n'
    assert [p.name for p in dest.parent.iterdir()] == ["run.json"]


def test_prepare_out_dir_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(QSPValidationError) as exc:
        prepare_out_dir(tmp_path, overwrite=False)
    assert exc.value.field == "--out" and "--overwrite" in exc.value.allowed
    assert prepare_out_dir(tmp_path, overwrite=True) == tmp_path
    assert prepare_out_dir(tmp_path / "new", overwrite=False).is_dir()  # a new or empty folder is fine


def test_atomic_files_get_the_permissions_of_a_plain_open_not_mkstemps_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "summary.json", {"a": 1})
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o600)  # an existing file keeps its own mode
        atomic_write_json(path, {"a": 2})
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
