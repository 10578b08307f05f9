"""The .pyi stub must describe exactly what xllm._C exports."""

import ast
import os
import platform
import subprocess
import sys
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
    if os.environ.get("XLLM_MAX_CPU_ISA"):  # the level is capped below what the features say
        return
    if level in ("avx512", "avx512_bf16", "amx"):
        assert features["avx512_vnni"] and features["avx512bw"] and features["avx512dq"]
    assert (level in ("avx512_bf16", "amx")) == (level != "avx512" and features["avx512_bf16"]
                                                  and features["avx512_vnni"])
    assert (level == "amx") == (features["amx_bf16"] and features["amx_int8"]
                                and features["avx512_bf16"])


def _isa_in_subprocess(max_isa: str) -> subprocess.CompletedProcess:
    code = ("from xllm import _C; "
            "print(_C.detected_isa(), _C.cpu_isa(), ','.join(_C.cpu_isas()), "
            "sum(_C.cpu_features().values()))")
    env = {**os.environ, "XLLM_MAX_CPU_ISA": max_isa}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


def test_max_cpu_isa_caps_the_level() -> None:
    """XLLM_MAX_CPU_ISA runs the process as on a CPU of that level (never above this CPU's);
    the features stay what the CPU has; a value that is not a level fails the import with a
    message that says what to set."""
    levels = _C.cpu_isas()
    features = sum(_C.cpu_features().values())
    caps = list(levels)
    if "XLLM_MAX_CPU_ISA" not in os.environ:  # this CPU's own level is known: cap above it
        caps.append("amx")
    for cap in caps:
        run = _isa_in_subprocess(cap)
        assert run.returncode == 0, run.stderr
        expect = cap if cap in levels else levels[-1]
        assert run.stdout.split() == [expect, expect,
                                      ",".join(levels[:levels.index(expect) + 1]),
                                      str(features)]
    run = _isa_in_subprocess("avx1024")
    assert run.returncode != 0
    assert "XLLM_MAX_CPU_ISA='avx1024' is not an ISA level" in run.stderr
