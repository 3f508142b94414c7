"""Progress for people watching a run: one line per stage, bars for driver-side loops, a closing table.

Lines go to stderr, so that a command's stdout keeps only its results. Bars are drawn only on a
terminal: in a log file a redrawn bar is megabytes of carriage returns, so there a loop prints one line
when it starts and one when it ends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

# Numbers of a stage's stats worth a column in the closing table, in the order shown.
KEY_NUMBERS = (
    "candidates", "images", "ok", "rejected", "failed", "groups", "removed", "classes", "models",
    "exported", "too_small", "blacklisted", "test_images", "top1_original", "top1_cropped_label_free",
    "pages", "thumbnails", "heatmaps",
)  # fmt: skip


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a StringIO, a closed or redirected stream
        return False


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stage_running(name: str) -> None:
    say(f"stage {name}: running")


def stage_done(name: str, seconds: float) -> None:
    say(f"stage {name}: done in {seconds:.1f} s")


def stage_skipped(name: str) -> None:
    say(f"stage {name}: skipped (already complete)")


def bar(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """``items`` with a progress bar on a terminal (tqdm), or a start and an end line elsewhere."""
    if on_terminal():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit="img", leave=False, file=sys.stderr)
        return
    start = time.perf_counter()
    say(f"{desc}: {total} to do")
    yield from items
    say(f"{desc}: {total} done in {time.perf_counter() - start:.1f} s")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return f"{value:.3f}" if isinstance(value, float) and not float(value).is_integer() else f"{int(value)}"


def _flat(stats: Mapping[str, Any]) -> dict[str, Any]:
    """Stats with dict values of counts summed (``blacklisted: {label_not_found: 3}`` -> 3)."""
    flat = {}
    for key, value in stats.items():
        if isinstance(value, Mapping):
            counts = [v for v in value.values() if isinstance(v, int | float) and not isinstance(v, bool)]
            if counts and len(counts) == len(value):
                value = sum(counts)
        flat[key] = value
    return flat


def stage_table(results: Mapping[str, Any]) -> str:
    """The closing table: per stage ran or skipped, seconds, and its key numbers (``StageResult``s)."""
    rows = []
    for name, result in results.items():
        stats = _flat(result.stats)
        numbers = ", ".join(f"{k} {_number(stats[k])}" for k in KEY_NUMBERS if _number(stats.get(k)))
        seconds = "" if result.skipped else f"{result.seconds:.1f}"
        rows.append((name, "skipped" if result.skipped else "ran", seconds, numbers))
    header = ("stage", "status", "seconds", "key numbers")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)]
    w0, w1, w2 = widths
    lines = [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:>{w2}}  {r[3]}" for r in [header, *rows]]
    return "\n".join(["Stages", *(line.rstrip() for line in lines)])
