"""Mistakes a user can fix end in one line on stderr and exit 2, never a traceback (``-v`` adds one).

Most cases run ``pipeline.cli.main`` in-process: the errors come from checks made before OUT is written
and before Ray starts, so these tests start no Ray (one, on the session's Ray, is about an error found
only after the start).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, main

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def one_line(err: str, *words: str) -> str:
    """The single line of ``err``; it starts with ``cropclean:`` and holds each of ``words``."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cropclean: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def image_folder(root: Path) -> Path:
    """An ImageFolder source: one class, one file named like an image (its bytes are never read here)."""
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.jpg").write_bytes(b"not read before the error")
    return root


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder that an unprivileged user can reach (pytest's own tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="cropclean-cli-"))
    path.chmod(0o755)
    yield path
    for sub in path.rglob("*"):  # restore what a test locked, so that the folder can be removed
        if sub.is_dir() and not sub.is_symlink():
            sub.chmod(0o755)
    shutil.rmtree(path)


# Root reads and writes through any file mode: the child drops to ``nobody`` once the interpreter has
# loaded what the command needs (the interpreter's own files may be private to root).
AS_NOBODY = f"""
import os, sys
import pipeline.cli
from pipeline.pipelines import INGEST, stages
stages(INGEST)  # the modules the command imports, while the interpreter's files are still readable
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
sys.exit(pipeline.cli.main(sys.argv[1:]))
"""


def run_unprivileged(*argv: str) -> tuple[int, str, str]:
    """``cropclean ARGV`` as a user whom file modes apply to: in-process, or as root in a child process
    that runs it as ``nobody``."""
    if os.geteuid() != 0:
        return run_cli(*argv)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", AS_NOBODY, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize(
    "command",
    [
        ["ingest", "{missing}", "--out", "{out}"],
        ["clean", "{missing}", "--out", "{out}"],
        ["crawl", "--urls", "{missing}.csv", "--out", "{out}"],
    ],
)
def test_a_missing_source_is_one_line_and_nothing_is_written(tmp_path, command):
    missing, out = tmp_path / "no-such-dataset", tmp_path / "run"
    argv = [part.format(missing=missing, out=out) for part in command]
    code, stdout, err = run_cli(*argv)
    assert code == EXIT_USAGE and stdout == ""
    one_line(err, str(missing), "no such file or folder")
    assert not out.exists()  # checked before OUT is written (and before Ray starts)


def test_a_source_in_a_config_file_is_checked_too(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"sources:\n  - uri: {tmp_path / 'gone'}\nout: {tmp_path / 'run'}\n")
    code, _, err = run_cli("run", str(config))
    assert code == EXIT_USAGE
    one_line(err, str(tmp_path / "gone"), "no such file or folder")


def test_a_url_list_given_as_an_image_folder_says_which_kind_fits(tmp_path):
    urls = tmp_path / "list.csv"
    urls.write_text("url,label\nhttps://example.org/a.jpg,cat\n")
    code, _, err = run_cli("ingest", str(urls), "--kind", "imagefolder", "--out", str(tmp_path / "run"))
    assert code == EXIT_USAGE
    one_line(err, str(urls), "a file that looks like a URL list", "kind imagefolder reads a folder",
             "kind urllist fits it")  # fmt: skip


@pytest.mark.parametrize("command", [["ingest", "{src}", "--kind", "urllist"], ["crawl", "--urls", "{src}"]])
def test_a_folder_given_as_a_url_list_says_which_kind_fits(tmp_path, command):
    src = image_folder(tmp_path / "photos")
    argv = [part.format(src=src) for part in command]
    code, _, err = run_cli(*argv, "--out", str(tmp_path / "run"))
    assert code == EXIT_USAGE
    one_line(err, str(src), "a folder (it looks like imagefolder)", "kind urllist reads a list file",
             "kind imagefolder fits it")  # fmt: skip


def test_food101_on_a_folder_without_meta_says_which_kind_fits(tmp_path):
    src = image_folder(tmp_path / "photos")
    code, _, err = run_cli("ingest", str(src), "--kind", "food101", "--out", str(tmp_path / "run"))
    assert code == EXIT_USAGE
    one_line(err, str(src), "not a Food-101 layout", "meta/train.txt", "kind imagefolder fits it")


@pytest.mark.parametrize("kind", [None, "imagefolder", "food101"])
def test_a_file_where_a_folder_is_needed(tmp_path, kind):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff")
    code, _, err = run_cli("ingest", str(photo), *(["--kind", kind] if kind else []), "--out",
                           str(tmp_path / "run"))  # fmt: skip
    assert code == EXIT_USAGE
    one_line(err, str(photo), "a file", "folder")


def test_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "run"))
    assert code == EXIT_USAGE
    one_line(err, str(tmp_path / "empty"), "an empty folder")


def test_an_unreadable_folder(shared_tmp):
    locked = image_folder(shared_tmp / "locked")
    locked.chmod(0)
    code, _, err = run_unprivileged("ingest", str(locked), "--out", str(shared_tmp / "run"))
    assert code == EXIT_USAGE, err
    one_line(err, str(locked), "permission denied")


def test_a_folder_with_no_images_is_found_out_after_the_start(ray_local, tmp_path):
    """Class folders, but no file named like an image: only the reader knows, after Ray started."""
    src = tmp_path / "notes"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "readme.txt").write_text("no images here\n")
    code, _, err = run_cli("ingest", str(src), "--out", str(tmp_path / "run"))
    assert code == EXIT_USAGE and "Traceback" not in err
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("cropclean:")] == lines[-1:]  # after progress lines
    assert str(src) in lines[-1] and "no image files" in lines[-1]


# ----------------------------------------------------------------------------------------------- OUT


def test_out_in_a_read_only_place(shared_tmp):
    src = image_folder(shared_tmp / "photos")
    read_only = shared_tmp / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    out = read_only / "run"
    code, _, err = run_unprivileged("ingest", str(src), "--out", str(out))
    assert code == EXIT_USAGE, err
    one_line(err, str(read_only), "permission denied")
    assert not out.exists()


def test_out_that_is_a_file(tmp_path):
    src = image_folder(tmp_path / "photos")
    (tmp_path / "run").write_text("a file, not a run folder\n")
    code, _, err = run_cli("ingest", str(src), "--out", str(tmp_path / "run"))
    assert code == EXIT_USAGE
    one_line(err, str(tmp_path / "run"), "a file", "--out")


# -------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such config file"),
        ("out: /x\n  dedupe: 3\n", "not valid YAML: line 2, column 9: mapping values are not allowed here"),
        ("- a\n- b\n", "a run config is a mapping of sections, got list"),
        ("just words\n", "a run config is a mapping of sections, got str"),
        (b"\xff\xfe\x00bad", "not UTF-8 text"),
        ("folder", "a folder, not a config file"),
    ],
    ids=["missing", "bad-yaml", "list", "scalar", "binary", "folder"],
)
@pytest.mark.parametrize("command", ["clean", "run", "validate"])
def test_a_config_file_that_cannot_be_used(tmp_path, content, problem, command):
    config = tmp_path / "run.yaml"
    if content == "folder":
        config.mkdir()
    elif isinstance(content, bytes):
        config.write_bytes(content)
    elif content is not None:
        config.write_text(content)
    argv = ["clean", "--config", str(config), "--out", str(tmp_path / "run")] if command == "clean" else [
        command, str(config)]  # fmt: skip
    code, _, err = run_cli(*argv)
    assert code == EXIT_USAGE
    one_line(err, str(config), problem)


def test_an_unreadable_config_file(shared_tmp):
    config = shared_tmp / "run.yaml"
    config.write_text(f"sources: [{{uri: {shared_tmp}}}]\nout: {shared_tmp / 'run'}\n")
    config.chmod(0)
    code, _, err = run_unprivileged("validate", str(config))
    assert code == EXIT_USAGE, err
    one_line(err, str(config), "permission denied")


def test_an_invalid_config_names_its_file_in_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("sources: [{uri: /data}]\nout: /x\ndedupe: {radious: 3}\nsplit: {train: 2}\n")
    code, _, err = run_cli("validate", str(config))
    assert code == EXIT_USAGE
    one_line(err, str(config), "invalid run config", "dedupe.radious", "split")


def test_a_set_value_that_is_not_yaml(tmp_path):
    src = image_folder(tmp_path / "photos")
    code, _, err = run_cli("ingest", str(src), "--out", str(tmp_path / "run"), "--set", "dedupe.radius=[")
    assert code == EXIT_USAGE
    one_line(err, "--set dedupe.radius", "not valid YAML")


# -------------------------------------------------------------------------- -v, Ctrl-C, internal errors


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_adds_the_traceback_wherever_it_stands(tmp_path, where):
    argv = ["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]
    code, _, err = run_cli(*(["-v", *argv] if where == "before" else [*argv, "-v"]))
    assert code == EXIT_USAGE
    lines = err.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "SourceError" in err
    assert lines[-1] == f"cropclean: {tmp_path / 'missing'}: no such file or folder"


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, tmp_path):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_validate", interrupted)
    code, _, err = run_cli("validate", str(tmp_path / "run.yaml"))
    assert code == EXIT_INTERRUPTED
    one_line(err, "interrupted")


def test_an_internal_error_is_one_line_and_exit_1(monkeypatch, tmp_path):
    def broken(args):
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(cli, "cmd_validate", broken)
    code, _, err = run_cli("validate", str(tmp_path / "run.yaml"))
    assert code == EXIT_FAILED
    assert one_line(err) == (
        "cropclean: internal error: RuntimeError: a bug; over two lines (run with -v for the traceback)"
    )
    code, _, err = run_cli("validate", str(tmp_path / "run.yaml"), "-v")
    assert code == EXIT_FAILED and "Traceback" in err and 'raise RuntimeError("a bug' in err


def test_an_error_raised_in_a_ray_task_is_described_by_its_cause():
    from ray.exceptions import RayTaskError

    cause = PermissionError(13, "Permission denied", "/data/locked")
    wrapped = RayTaskError("normalize", "Traceback (most recent call last):\n  ...\n", cause)
    assert cli.describe_error(wrapped.as_instanceof_cause()) == (
        EXIT_USAGE,
        "/data/locked: permission denied",
    )
    assert cli.describe_error(OSError(28, "No space left on device", "/out/x")) == (
        EXIT_FAILED,
        "/out/x: no space left on device",
    )  # not the input's fault: a failure, still one line
    assert cli.describe_error(FileNotFoundError("s3://bucket/list.csv")) == (
        EXIT_USAGE,
        "s3://bucket/list.csv: no such file or folder",
    )  # fsspec's remote filesystems give the path alone


# ------------------------------------------------------------------------------- the real console


def test_the_console_shows_one_line_and_a_job_with_v_the_traceback(tmp_path):
    """As a person or a Ray job sees it: separate processes, the installed script and ``python -m jobs``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    script = Path(sys.executable).parent / "cropclean"
    first = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    missing = tmp_path / "no-such-dataset"
    proc = subprocess.run([*first, "ingest", str(missing), "--out", str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == EXIT_USAGE and proc.stdout == ""
    assert proc.stderr == f"cropclean: {missing}: no such file or folder\n"

    job = subprocess.run([sys.executable, "-m", "jobs.ingest", str(missing), "--out", str(tmp_path / "run"),
                          "-v"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert job.returncode == EXIT_USAGE
    assert job.stderr.startswith("Traceback (most recent call last):") and "check_source" in job.stderr
    assert job.stderr.splitlines()[-1] == f"cropclean: {missing}: no such file or folder"
