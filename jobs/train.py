"""Ray job: ``python -m jobs.train OUT [--set K=V ...]``.

Takes the same arguments as ``cropclean train`` (trains on an ingested run) and connects to the cluster
it is submitted to (``RAY_ADDRESS``), or starts a local instance.

Exit codes: 0 done, 1 failed, 2 a wrong argument, config or source (one line on stderr; ``-v``
anywhere adds the traceback), 130 interrupted.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
