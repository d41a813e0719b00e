"""Durations and ETA lines (mulmodseg.progress)."""

from mulmodseg import progress
from mulmodseg.progress import format_seconds, quarter_reporter


def test_format_seconds():
    assert [format_seconds(s) for s in (-3, 0, 12.9, 245, 3600, 11220)] == ["0s", "0s", "12s", "4m05s", "1h00m",
                                                                            "3h07m"]


def test_a_log_file_gets_a_progress_line_per_quarter(monkeypatch):
    now = [0.0]  # one second per window
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    lines = []
    report = quarter_reporter("[1/2] ct.nii.gz", lines.append)
    for done in range(1, 9):
        now[0] = float(done)
        report(done, 8)
    assert lines == ["[1/2] ct.nii.gz: 2/8 windows, ETA 6s", "[1/2] ct.nii.gz: 4/8 windows, ETA 4s",
                     "[1/2] ct.nii.gz: 6/8 windows, ETA 2s"]
