"""Whole files or none: atomic writes, a full disk named, temporaries of killed writers, folder locks."""

import errno
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from mulmodseg.checkpoint import load_checkpoint, save_checkpoint
from mulmodseg.errors import DiskFullError
from mulmodseg.files import (
    LOCK_FILE,
    FolderInUseError,
    atomic_write,
    dead_temporaries,
    lock_folder,
    mount_point,
    name_max,
    remove_dead_temporaries,
    temporary_path,
)


def test_a_full_disk_names_the_file_and_its_file_system_and_leaves_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epochs": 1}, {})

    def fill(tmp):
        tmp.write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as err:
        atomic_write(path, fill)
    assert str(err.value) == f"no space left on {mount_point(tmp_path)} while writing {path}; {path} is unchanged"
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert load_checkpoint(path)["config"] == {"epochs": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_temporary_name_keeps_a_long_legal_name_legal(tmp_path):
    # 243 characters: legal (255 is the limit), but ".PID.HEX." before it made the temporary's name illegal.
    path = tmp_path / ("s" * 236 + ".nii.gz")
    atomic_write(path, lambda tmp: nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), tmp))
    assert nib.load(path).shape == (2, 2, 2) and [p.name for p in tmp_path.iterdir()] == [path.name]
    tmp = temporary_path(path)
    assert len(tmp.name) == name_max(tmp_path) and tmp.name.endswith("s.nii.gz") and tmp.name.startswith(".")


def dead_pid() -> int:
    """The PID of a process that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_temporaries_of_killed_writers_are_removed_and_a_live_writers_kept(tmp_path):
    dead = tmp_path / f".{dead_pid()}.0123abcd.last.pt"
    dead.write_bytes(b"x" * 1_500_000)
    live = tmp_path / f".{os.getpid()}.89abcdef.last.pt"
    live.write_bytes(b"being written")
    (tmp_path / ".hidden.last.pt").write_bytes(b"not ours")
    assert dead_temporaries(tmp_path) == [dead]
    assert remove_dead_temporaries(tmp_path) == (f"removed 1 temporary file(s) (1.5 MB) that killed writes left in "
                                                 f"{tmp_path}: {dead.name}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, ".hidden.last.pt"])
    assert remove_dead_temporaries(tmp_path) is None


def test_a_folder_lock_names_its_holder_and_ends_with_it(tmp_path):
    script = (f"import time\nfrom mulmodseg.files import lock_folder\nheld = lock_folder({str(tmp_path)!r}, 'x')\n"
              "print('locked', flush=True)\ntime.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(FolderInUseError, match=f"{tmp_path} is being written by another training run "
                                                    f"\\(PID {holder.pid}\\); wait for it to end"):
            lock_folder(tmp_path, "training run")
    finally:
        holder.kill()  # kill -9: the kernel releases the lock, the file stays
        holder.wait()
    assert (tmp_path / LOCK_FILE).is_file()
    lock = lock_folder(tmp_path, "training run")
    assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    lock.release()
    assert list(tmp_path.iterdir()) == []  # the last holder removes the lock file
    assert lock_folder(tmp_path / "none", "x", create=False) is None and not (tmp_path / "none").exists()
    # Parts of one inference share the lock; a whole call does not join them.
    parts = [lock_folder(tmp_path, "infer.py", shared=True) for _ in range(2)]
    with pytest.raises(FolderInUseError, match=f"PID {os.getpid()}"):
        lock_folder(tmp_path, "infer.py")
    for part in parts:
        part.release()
    lock_folder(tmp_path, "infer.py").release()
