"""Progress output: bars only on a terminal, two plain lines elsewhere; the closing table of stages."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

from pipeline import progress
from pipeline.stages.base import StageResult


def test_a_loop_in_a_log_file_prints_a_start_and_an_end_line_and_no_bar():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert list(progress.bar(iter(range(500)), 500, "report: thumbnails")) == list(range(500))
    lines = err.getvalue().splitlines()
    assert lines[0] == "report: thumbnails: 500 to do"
    assert lines[1].startswith("report: thumbnails: 500 done in ") and len(lines) == 2
    assert "\r" not in err.getvalue()


def test_a_loop_on_a_terminal_draws_a_bar():
    """A child process whose stderr is a pseudo-terminal, as when a person runs a command."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 wide
    code = "from pipeline import progress; print(sum(progress.bar(iter(range(50)), 50, 'heatmaps')))"
    done = subprocess.run([sys.executable, "-c", code], stderr=follower, stdout=subprocess.PIPE, text=True,
                          timeout=60, check=True)  # fmt: skip
    drawn = os.read(leader, 65536).decode(errors="replace")  # the follower is still open here
    os.close(follower)
    os.close(leader)
    assert done.stdout.strip() == str(sum(range(50)))
    assert "heatmaps:" in drawn and "0/50" in drawn and "\r" in drawn  # drawn, then cleared (leave=False)


def test_stage_table_shows_ran_or_skipped_seconds_and_key_numbers():
    table = progress.stage_table({
        "normalize": StageResult(stats={"ok": 90, "rejected": 7, "shards": [1, 2]}, seconds=12.34),
        "crop": StageResult(stats={"exported": 80, "blacklisted": {"label_not_found": 4, "cross_label": 2}},
                            seconds=3.0),
        "dedupe": StageResult(stats={"removed": 3}, skipped=True),
    })  # fmt: skip
    lines = table.splitlines()
    assert lines[0] == "Stages" and lines[1].split() == ["stage", "status", "seconds", "key", "numbers"]
    assert lines[2].split() == ["normalize", "ran", "12.3", "ok", "90,", "rejected", "7"]
    assert lines[3].split() == ["crop", "ran", "3.0", "exported", "80,", "blacklisted", "6"]
    assert lines[4].split()[:2] == ["dedupe", "skipped"] and "removed 3" in lines[4]
