"""The .pyi stub must describe exactly what xllm._C exports."""

import ast
import platform
from pathlib import Path

import pytest

import xllm
from xllm import _C


def _stub_names() -> set[str]:
    tree = ast.parse((Path(xllm.__file__).parent / "_C.pyi").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_stub_matches_module() -> None:
    exported = {n for n in dir(_C) if not n.startswith("_")}
    stub = _stub_names()
    assert exported - stub == set(), f"exported but missing from _C.pyi: {exported - stub}"
    assert stub - exported == set(), f"in _C.pyi but not exported: {stub - exported}"


def test_isa_switch() -> None:
    best = _C.detected_isa()
    levels = _C.cpu_isas()
    assert levels == ["scalar", "avx2", "avx512", "avx512_bf16", "amx"][: len(levels)]
    assert levels[-1] == best
    try:
        for level in levels:
            _C.set_cpu_isa(level)
            assert _C.cpu_isa() == level
        for above in ["scalar", "avx2", "avx512", "avx512_bf16", "amx"][len(levels):]:
            with pytest.raises(ValueError, match="does not support"):
                _C.set_cpu_isa(above)
        with pytest.raises(ValueError, match="must be"):
            _C.set_cpu_isa("sse9")
    finally:
        _C.set_cpu_isa(best)
    assert _C.cpu_isa() == best


def _cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 feature flags")
def test_cpu_features_match_the_kernel() -> None:
    """cpuid as the module reads it agrees with what Linux reports in /proc/cpuinfo."""
    features = _C.cpu_features()
    flags = _cpuinfo_flags()
    linux_name = {"avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16"}
    for name, have in features.items():
        assert have == (linux_name.get(name, name) in flags), name
    level = _C.detected_isa()
    if level in ("avx512", "avx512_bf16", "amx"):
        assert features["avx512_vnni"] and features["avx512bw"] and features["avx512dq"]
    assert (level in ("avx512_bf16", "amx")) == (level != "avx512" and features["avx512_bf16"]
                                                  and features["avx512_vnni"])
    assert (level == "amx") == (features["amx_bf16"] and features["amx_int8"]
                                and features["avx512_bf16"])
