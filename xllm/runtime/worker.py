"""``python -m xllm.runtime.worker SPEC``: one tensor-parallel worker rank (``xllm.runtime.tp``)."""

import sys

from xllm.runtime.tp import main

sys.exit(main())
