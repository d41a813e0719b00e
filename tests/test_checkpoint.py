"""The checkpoint file: atomic writes with the umask's mode, versioned reads with clear errors."""
import os

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
