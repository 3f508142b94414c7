"""Ray job: ``python -m jobs.clean SOURCE --out OUT [--preset P] [--set K=V ...]``, or
``python -m jobs.clean --config URI [--set K=V ...]`` with a run config on local disk or in object storage.

Everything, as ``cropclean clean``: ingest, train, crop and blacklist, evaluate. It connects to the
cluster it is submitted to (``RAY_ADDRESS``), or starts a local instance. A re-submitted job on the same
OUT skips the stages and shards that finished.

Exit codes: 0 done, 1 failed, 2 a wrong argument, config or source (one line on stderr; ``-v``
anywhere adds the traceback), 130 interrupted.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["clean", *sys.argv[1:]]))
