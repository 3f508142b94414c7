"""Ray job: ``python -m jobs.crawl --classes "ramen,pho" --provider brave --out OUT`` or
``python -m jobs.crawl --urls LIST --out OUT``; the same arguments as ``cropclean crawl``. Provider keys
come from the job's environment (``runtime_env={"env_vars": ...}``).

Exit codes: 0 done, 1 failed, 2 a wrong argument, config or source (one line on stderr; ``-v``
anywhere adds the traceback), 130 interrupted.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["crawl", *sys.argv[1:]]))
