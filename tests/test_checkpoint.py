"""Checkpoint files: written with the umask's mode and read back, unusable ones named with the reason, torch.save on a
real full disk (atomic writes, temporaries and folder locks: test_files.py)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from mulmodseg.checkpoint import FORMAT_VERSION, CheckpointError, atomic_save, load_checkpoint, save_checkpoint


def test_round_trip_and_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "run" / "last.pt", {"epochs": 3}, {"w": torch.arange(4.0)}, epoch=2)
    finally:
        os.umask(old)
    path = tmp_path / "run" / "last.pt"
    assert path.stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, not a temporary file's 0o600
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["config"] == {"epochs": 3} and ckpt["epoch"] == 2
    assert torch.equal(ckpt["model"]["w"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epochs": 1}, {})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"format_version": FORMAT_VERSION, "x": Unpicklable()}, path)
    assert load_checkpoint(path)["config"] == {"epochs": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_unusable_files_are_named_with_the_reason(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'none.pt'}: no such checkpoint file"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"net": {}}, tmp_path / "reference.pt")
    with pytest.raises(CheckpointError, match="not a mulmodseg checkpoint .*load_reference_checkpoint"):
        load_checkpoint(tmp_path / "reference.pt")
    torch.save({"format_version": FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match=f"written by a newer mulmodseg \\(format {FORMAT_VERSION + 1}"):
        load_checkpoint(tmp_path / "newer.pt")


TMPFS = shutil.which("unshare") and subprocess.run(
    ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True).returncode == 0


@pytest.mark.skipif(not TMPFS, reason="needs unshare -rm and mount to make a small tmpfs")
def test_torch_save_on_a_real_full_disk_is_a_disk_full_error(tmp_path):
    # torch's own file writer says only "[enforce fail at inline_container.cc] unexpected pos"; through a Python
    # file the system's ENOSPC comes back, and with it the message.
    script = ("import torch\nfrom mulmodseg.checkpoint import atomic_save\nfrom mulmodseg.errors import DiskFullError\n"
              "try:\n    atomic_save({'w': torch.zeros(100_000)}, '/mnt/run/last.pt')\n"
              "except DiskFullError as e:\n    print('DiskFullError', e)\n"
              "import os\nprint(sorted(os.listdir('/mnt/run')))\n")
    (tmp_path / "s.py").write_text(script)
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs /mnt && "
                           f"{sys.executable} {tmp_path / 's.py'}"], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == [
        "DiskFullError no space left on /mnt while writing /mnt/run/last.pt; /mnt/run/last.pt is unchanged", "[]"
    ], proc.stderr
