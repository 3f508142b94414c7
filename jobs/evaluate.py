"""Ray job: ``python -m jobs.evaluate OUT [--set K=V ...]``.

Takes the same arguments as ``cropclean evaluate`` (the paper's Table IV on a run that was ingested,
trained and cropped: a classifier outside the ensemble on original and cropped test images) and connects
to the cluster it is submitted to (``RAY_ADDRESS``), or starts a local instance.

Exit codes: 0 done, 1 failed, 2 a wrong argument, config or source (one line on stderr; ``-v``
anywhere adds the traceback), 130 interrupted.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
