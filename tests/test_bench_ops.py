"""The op benchmark harness runs end to end and writes well-formed rows (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ops.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_json_rows(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ops", "--quick", "--only", "block_pool,vmm",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {r["op"].split()[0] for r in rows} >= {"allocate+free", "vmm"}
    for row in rows:
        assert row["native_s"] > 0 and row["reference_s"] > 0
        assert row["ratio"] == pytest.approx(row["reference_s"] / row["native_s"])
        assert row["reference"]
        if row["target"]:
            assert isinstance(row["met"], bool)
    # The printed table names every row too.
    for row in rows:
        assert row["shape"] in proc.stdout


def test_unknown_suite_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--only", "nosuch"])
    assert exc.value.code == 2
    assert "unknown suite" in capsys.readouterr().err
