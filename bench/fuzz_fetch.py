"""Fuzzing the fetch and validate path at scale: the generator of ``tests/test_fetch_fuzz.py`` (seeded URLs
and server answers against the hostile loopback server, through ``Fetcher.fetch`` and the normalize
stage's ``process_candidate``, without Ray), run for ``--cases`` cases.

Prints the number of cases, the outcomes per status and reason, how many cases had an outcome the URL
decided beforehand (and met it), the problems found (none expected: exit status 1 otherwise) and the
wall time.

Run: ``python bench/fuzz_fetch.py --cases 10000 [--seed 1729] [--threads 8]``.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_fetch_fuzz import SEED, THREADS, check_run, generate, rig, run_cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--batch", type=int, default=1000, help="cases per batch (rows checked per batch)")
    args = ap.parse_args(argv)

    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    found: list[str] = []
    decided = 0
    start = time.monotonic()
    with rig() as r:
        cases = generate(args.seed, args.cases, r)
        decided = sum(c.expect is not None for c in cases)
        for lo in range(0, len(cases), args.batch):
            batch = cases[lo : lo + args.batch]
            rows = run_cases(r, batch, args.threads)
            found += check_run(r, batch, rows)
            outcomes.update((str(row["status"]), str(row["reason"] or "-")) for row in rows)
        echo_hits, blocked_hits = r.server.hits["/echo"], sum(r.blocked.hits.values())
    wall = time.monotonic() - start

    print(f"cases: {args.cases} (seed {args.seed}, {args.threads} threads)")
    print(f"outcome decided by the URL beforehand: {decided} cases")
    print(f"requests to /echo: {echo_hits}; to the blocked server: {blocked_hits}")
    print("outcomes (status, reason, count):")
    for (status, reason), count in sorted(outcomes.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {status:9} {reason:26} {count:6}")
    print(f"problems: {len(found)}")
    for line in found[:50]:
        print(f"  {line}")
    print(f"wall time: {wall:.1f} s ({args.cases / wall:.0f} cases/s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
