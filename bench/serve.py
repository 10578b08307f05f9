"""``python -m bench.serve``: the serving benchmark (see xllm/benchmarks/serve.py)."""

from __future__ import annotations

import sys

from xllm.benchmarks.serve import main

if __name__ == "__main__":
    sys.exit(main())
