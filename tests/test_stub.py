"""The .pyi stub must describe exactly what xllm._C exports."""

import ast
from pathlib import Path

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
    assert best in ("avx2", "scalar")
    try:
        _C.set_cpu_isa("scalar")
        assert _C.cpu_isa() == "scalar"
    finally:
        _C.set_cpu_isa(best)
    assert _C.cpu_isa() == best
