"""Running a Triton test module's interpreter cases in a child pytest: Triton decides between
compiled and interpreted kernels when ``triton`` is first imported, so a module whose
TRITON_INTERPRET=1 came too late (another test module imported triton first) runs its CPU
cases again in a process where the flag is set from the start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_interpreter_cases(test_file: str) -> None:
    """Runs ``test_file``'s non-gpu tests (all but this re-run) under TRITON_INTERPRET=1 and
    asserts they passed with none skipped."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", "-k",
         "not test_interpreter_cases_in_subprocess", str(Path(test_file).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], (
        result.stdout[-2000:])
