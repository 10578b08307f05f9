"""bench.throughput's command line: engines in their own default dtype and in fp32."""

from __future__ import annotations

import pytest

from bench.throughput import ENGINES, LABELS, _parse_args


def test_engines_and_labels() -> None:
    assert {"xllm", "xllm-fp32", "xllm-bf16", "vllm", "vllm-fp32", "llamacpp",
            "transformers"} == set(ENGINES)
    assert set(LABELS) == set(ENGINES)
    args = _parse_args(["--engines", "xllm,xllm-fp32,vllm", "--scenarios", "single,batch64"])
    assert args.engines == ["xllm", "xllm-fp32", "vllm"]
    assert args.scenarios == ["single", "batch64"]
    with pytest.raises(SystemExit):
        _parse_args(["--engines", "xllm-int3"])
