"""bench.throughput's command line: engines in their own default dtype and in fp32."""

from __future__ import annotations

import pytest

from bench.throughput import ENGINES, LABELS, _parse_args


def test_engines_and_labels() -> None:
    assert {"xllm", "xllm-fp32", "xllm-bf16", "xllm-int8", "vllm", "vllm-fp32", "llamacpp",
            "transformers"} == set(ENGINES)
    assert set(LABELS) == set(ENGINES)
    args = _parse_args(["--engines", "xllm,xllm-fp32,vllm", "--scenarios", "single,batch64"])
    assert args.engines == ["xllm", "xllm-fp32", "vllm"]
    assert args.scenarios == ["single", "batch64"]
    with pytest.raises(SystemExit):
        _parse_args(["--engines", "xllm-int3"])
    assert _parse_args(["--model", "/some/dir"]).model == "/some/dir"


def test_random_checkpoint_refuses_what_it_cannot_write(tmp_path) -> None:  # noqa: ANN001
    from bench import random_checkpoint

    with pytest.raises(ValueError, match="unknown shape"):
        random_checkpoint.write("llama-7t", tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a model"):
        random_checkpoint.write("llama3.2-1b", tmp_path / "b")
