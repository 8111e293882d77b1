"""GGUF files as base models: de-quantised once into a plain transformers folder, cached per user.

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=...)`, with the `gguf`
package) by de-quantising every tensor to fp32, which takes tens of seconds, and a model loaded
that way refuses `save_pretrained`. So the first use converts: the de-quantised state dict is
copied into a model built from the same config without its `quantization_config` (on the meta
device, so nothing is initialised twice), saved as safetensors with the GGUF's tokenizer and
chat template, and published under `<cache_root>/gguf/<stem>-<sha256[:16]>-v<N>/` (temp dir +
rename, under a file lock, with a manifest of every file's sha256). Later loads read that
folder in seconds, like any local model. The key is the GGUF's content and this conversion's
version, so the same file converts once whatever its path.

Weights stay fp32 (the exact de-quantised values: Q4_1 blocks are scale * q + min, which bf16
would round); SmolLM2-135M takes 538 MB on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructflow import user_cache

# Bump when the converted folder's content would change (a new conversion recipe).
CONVERSION_VERSION = 1
INFO_FILE = "conversion.json"
SUFFIX = ".gguf"
LOCK_TIMEOUT_S = 3600

Progress = Callable[[str], None]
# (path, size, mtime) -> sha256 / verified folder: a run asks several times; hashing the
# 98 MB GGUF and the 538 MB folder once per process is enough.
_digests: dict[tuple[str, int, int], str] = {}
_verified: dict[tuple[str, int, int], Path] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per process while it is unchanged."""
    from instructflow.artifacts import sha256_file

    key = _stat_key(Path(path).resolve())
    if key not in _digests:
        _digests[key] = sha256_file(Path(path))
    return _digests[key]


class GGUFError(RuntimeError):
    """A GGUF file that cannot be converted; one-line message."""


def is_gguf(spec: str) -> bool:
    return spec.lower().endswith(SUFFIX)


def root() -> Path:
    return user_cache.gguf_root()


def target_dir(gguf_sha256: str, stem: str) -> Path:
    return root() / f"{stem}-{gguf_sha256[:16]}-v{CONVERSION_VERSION}"


def intact(folder: Path) -> bool:
    from instructflow.artifacts import folder_intact

    return folder_intact(folder)


def content_digest(folder: Path) -> str:
    """The identity of the converted weights, config and tokenizer in cache keys: the digest of
    every file but conversion.json (which records how long the conversion took)."""
    from instructflow.artifacts import MANIFEST, digest_of

    files = json.loads((folder / MANIFEST).read_text())["files"]
    return digest_of({name: sha for name, sha in files.items() if name != INFO_FILE})


def converted(gguf: Path, progress: Progress | None = None) -> Path:
    """The converted folder of `gguf` (built on first use; rebuilt if it fails its check)."""
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise GGUFError(f"{gguf}: no such GGUF file")
    seen = _stat_key(gguf)
    if seen in _verified and _verified[seen].is_dir():
        return _verified[seen]
    folder = _converted(gguf, file_sha256(gguf), progress)
    _verified[seen] = folder
    return folder


def _converted(gguf: Path, sha: str, progress: Progress | None) -> Path:
    from instructflow import waits

    folder = target_dir(sha, gguf.name[: -len(SUFFIX)])
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f"{folder.name}.lock"
    try:
        with waits.cache_lock(lock, f"converting {gguf.name}", LOCK_TIMEOUT_S):
            return _convert_once(gguf, sha, folder, progress)
    except waits.LockTimeout as exc:
        raise GGUFError(str(exc)) from None


def _convert_once(gguf: Path, sha: str, folder: Path, progress: Progress | None) -> Path:
    """Under the folder's lock: the intact folder, or a fresh conversion renamed into place."""
    if folder.is_dir():
        if intact(folder):
            return folder
        shutil.rmtree(folder, ignore_errors=True)  # half-written or edited: convert again
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        _convert(gguf, sha, tmp, progress)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _convert(gguf: Path, sha: str, out: Path, progress: Progress | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructflow.artifacts import MANIFEST, digest_of, hash_tree

    started = time.perf_counter()
    if progress:
        progress(f"de-quantising {gguf.name} (once per user, ~30 s)")
    try:
        with _quiet_tqdm():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
    except ImportError as exc:
        raise GGUFError(f"{gguf}: reading GGUF needs the gguf package ({exc})") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise GGUFError(f"{gguf}: transformers cannot load this GGUF file ({first})") from None
    plain = _without_quantization(loaded)
    del loaded
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = int(getattr(plain.config, "max_position_embeddings", 0) or 2048)
    if progress:
        progress(f"saving the de-quantised {type(plain).__name__}")
    plain.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    info: dict[str, Any] = {
        "gguf": gguf.name,
        "gguf_sha256": sha,
        "conversion_version": CONVERSION_VERSION,
        "architecture": type(plain).__name__,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "seconds": round(time.perf_counter() - started, 1),
        "transformers": _version("transformers"),
        "gguf_package": _version("gguf"),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    files = hash_tree(out)
    (out / MANIFEST).write_text(json.dumps({"digest": digest_of(files), "files": files}, indent=1))


@contextlib.contextmanager
def _quiet_tqdm():
    """transformers' GGUF reader draws a plain tqdm bar over the run's own progress display;
    the conversion reports its progress through `progress` instead."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as reader

    bar = getattr(reader, "tqdm", None)
    if bar is not None:
        reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            reader.tqdm = bar


def _without_quantization(loaded):
    """The same weights in a model whose config has no quantization_config (so it saves)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config = type(loaded.config).from_dict(config)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.eval()
    return plain


def info(folder: Path) -> dict[str, Any]:
    return json.loads((folder / INFO_FILE).read_text())


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
