"""Reading a Hugging Face model directory: config.json and its safetensors weights.

Weights are read through `safetensors.safe_open`, which memory-maps each file: a tensor's
bytes are paged in when it is asked for, so a model never needs twice its size in memory.
Layouts accepted, in the order they are looked for:

1. `model.safetensors.index.json` + the shards its `weight_map` names (HF's sharded layout);
2. `model.safetensors` (one file);
3. other `*.safetensors` files without an index (as some exporters write them).

Every failure names the path and says what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def check_model_dir(model_dir: str | Path) -> Path:
    """Returns `model_dir` as a Path once it is a directory holding config.json."""
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(
            f"model path {path} is a file; pass the Hugging Face model directory that holds "
            f"config.json and the *.safetensors weights (a .gguf file must be converted first "
            f"with xllm.loader.gguf_import.convert_gguf_to_hf)"
        )
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{path} has no {CONFIG_NAME}; a Hugging Face model directory needs config.json "
            f"next to its *.safetensors weights"
        )
    return path


def weight_files(model_dir: str | Path) -> dict[Path, list[str] | None]:
    """The safetensors files to read, each with the tensor names the index assigns to it.

    The names are None when there is no index (read every tensor in the file).
    """
    path = check_model_dir(model_dir)
    index_path = path / INDEX_NAME
    if index_path.is_file():
        return _files_from_index(index_path)
    single = path / SINGLE_WEIGHTS_NAME
    if single.is_file():
        return {single: None}
    found = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if found:
        return {p: None for p in found}
    other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = (
        f" It holds {', '.join(other)}: only safetensors weights are read; convert them (for a "
        f".gguf use xllm.loader.gguf_import.convert_gguf_to_hf)."
        if other
        else ""
    )
    raise FileNotFoundError(
        f"{path} has no weights: expected {SINGLE_WEIGHTS_NAME}, or sharded *.safetensors with "
        f"{INDEX_NAME}.{hint}"
    )


def _files_from_index(index_path: Path) -> dict[Path, list[str] | None]:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{index_path} is not valid JSON ({e}); re-download or rewrite it") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no 'weight_map' (tensor name -> shard file)")
    by_file: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or shard in ("", ".", ".."):
            raise ValueError(
                f"{index_path}: tensor {name!r} maps to an invalid shard name {shard!r}"
            )
        by_file.setdefault(index_path.parent / shard, []).append(name)
    missing = sorted(p.name for p in by_file if not p.is_file())
    if missing:
        raise FileNotFoundError(
            f"{index_path} names shard(s) that are not in {index_path.parent}: "
            f"{', '.join(missing)}; download the missing shard(s) or fix the index"
        )
    return dict(sorted(by_file.items()))


def iter_weights(
    model_dir: str | Path, progress: bool = True, lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF tensor name, tensor) for every weight of the model in `model_dir`.

    ``lazy``: yields safetensors slices (``get_slice``) instead, valid until the next item,
    of which the consumer reads only what it indexes (a tensor-parallel rank its share).

    Tensors keep the checkpoint's dtype; the model's load_weights converts. With an index,
    each shard must hold exactly the tensors the index assigns to it (a stale index would
    otherwise load a model with silently missing weights).
    """
    files = weight_files(model_dir)
    # Reading the headers first gives the progress bar its total and catches
    # index/shard disagreements before any tensor is handed out.
    plan: list[tuple[Path, list[str]]] = []
    seen: dict[str, Path] = {}
    for file, expected in files.items():
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
        if expected is not None:
            wanted = set(expected)
            absent = sorted(wanted - set(names))
            if absent:
                raise ValueError(
                    f"{INDEX_NAME} assigns {len(absent)} tensor(s) to {file.name} that it does not "
                    f"contain (first: {absent[0]!r}); the index and the shards disagree"
                )
            names = [n for n in names if n in wanted]
        for name in names:
            if name in seen:
                raise ValueError(
                    f"tensor {name!r} is in both {seen[name].name} and {file.name}; "
                    f"remove the stale file"
                )
            seen[name] = file
        plan.append((file, names))
    bar = tqdm(total=len(seen), desc="Loading weights", unit="tensor", disable=not progress)
    try:
        for file, names in plan:
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    yield name, f.get_slice(name) if lazy else f.get_tensor(name)
                    bar.update(1)
    finally:
        bar.close()


def read_tensors(model_dir: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of the checkpoint in ``model_dir`` (memory-mapped reads of just
    those; KeyError naming a tensor the checkpoint lacks). Expert parallelism reads the
    experts a rank gains in a rebalance with it."""
    wanted = set(names)
    found: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in wanted.intersection(f.keys()):
                found[name] = f.get_tensor(name)
    missing = sorted(wanted - set(found))
    if missing:
        raise KeyError(f"the checkpoint in {model_dir} lacks {missing[0]!r}"
                       + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return found
