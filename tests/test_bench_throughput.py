"""bench.throughput's command line: engines in their own default dtype and in fp32."""

from __future__ import annotations

import pytest

from bench.throughput import ENGINES, LABELS, _parse_args, main


def test_engines_and_labels() -> None:
    assert {"xllm", "xllm-fp32", "xllm-bf16", "xllm-int8", "xllm-int16", "vllm", "vllm-fp32",
            "llamacpp", "transformers"} == set(ENGINES)
    assert set(LABELS) == set(ENGINES)
    args = _parse_args(["--engines", "xllm,xllm-fp32,vllm", "--scenarios", "single,batch64"])
    assert args.engines == ["xllm", "xllm-fp32", "vllm"]
    assert args.scenarios == ["single", "batch64"]
    with pytest.raises(SystemExit):
        _parse_args(["--engines", "xllm-int3"])
    assert _parse_args(["--model", "/some/dir"]).model == "/some/dir"
    assert _parse_args(["--scenarios", "prefill2k,prefill4k"]).scenarios == ["prefill2k",
                                                                           "prefill4k"]
    assert _parse_args(["--isa", "avx2"]).isa == "avx2"
    with pytest.raises(SystemExit):
        _parse_args(["--isa", "avx3"])


def test_isa_above_the_cpus_level_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from xllm import _C

    levels = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")
    above = [lv for lv in levels if lv not in _C.cpu_isas()]
    if not above:
        pytest.skip("this CPU has every level")
    assert main(["--isa", above[0], "--engines", "xllm", "--scenarios", "single"]) == 2
    assert "above this CPU's level" in capsys.readouterr().err


def test_random_checkpoint_refuses_what_it_cannot_write(tmp_path) -> None:  # noqa: ANN001
    from bench import random_checkpoint

    with pytest.raises(ValueError, match="unknown shape"):
        random_checkpoint.write("llama-7t", tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a model"):
        random_checkpoint.write("llama3.2-1b", tmp_path / "b")
