"""download: fetch the raw data into the workspace (local file/folder, http(s) URL, hub id).

The stage is cached on the source's *current* fingerprint (file contents, or the URL's
ETag/Last-Modified, or the hub dataset's revision), so a nightly run re-checks the source:
unchanged data is a cache hit and everything downstream is Cached too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import instructflow
from instructflow import demo_data, sources
from instructflow.artifacts import ArtifactRef, sha256_file, write_artifact
from instructflow.caching import stage_task
from instructflow.config import SourceSpec

SUPPORTED = (".json", ".jsonl", ".csv", ".parquet")
# Real datasets shipped inside the package (each folder holds its licence notice).
DATA_DIR = Path(instructflow.__file__).parent / "data"
BUILTIN_FILES = {"builtin:ch07": DATA_DIR / "ch07" / "instruction-data.json"}
BUILTIN_DATASETS = ("builtin:demo", *BUILTIN_FILES)


class DownloadError(RuntimeError):
    pass


def source_kind(source: str) -> str:
    try:
        return sources.source_kind(source)
    except sources.SourceError as exc:
        raise DownloadError(str(exc)) from None


def local_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
    if not files:
        raise DownloadError(f"{source}: folder holds no {'/'.join(SUPPORTED)} files")
    return files


def _http_validators(cfg: SourceSpec) -> dict[str, str] | None:
    """ETag / Last-Modified / length from a HEAD request; None when the server gives none."""
    import httpx

    try:
        resp = httpx.head(cfg.source, timeout=cfg.timeout_s, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise DownloadError(f"{cfg.source}: {type(exc).__name__}: {exc}") from None
    if resp.status_code >= 400:
        raise DownloadError(f"{cfg.source}: HTTP {resp.status_code}")
    keep = {
        k: resp.headers[k] for k in ("etag", "last-modified", "content-length") if k in resp.headers
    }
    return keep if ("etag" in keep or "last-modified" in keep) else None


def fingerprint(cfg: SourceSpec) -> Any:
    """What the source looks like right now; part of the download cache key."""
    kind = source_kind(cfg.source)
    if kind == "builtin" and cfg.source in BUILTIN_FILES:
        return {"builtin": cfg.source, "sha256": sha256_file(BUILTIN_FILES[cfg.source])}
    if kind == "builtin":
        return {"builtin": cfg.source}
    if kind == "local":
        return {str(p): sha256_file(p) for p in local_files(cfg.source)}
    if kind == "url":
        if cfg.sha256:
            return {"sha256": cfg.sha256}
        validators = _http_validators(cfg)
        # No validators: nothing tells us the content is unchanged, so always fetch.
        return validators if validators is not None else {"nonce": _nonce()}
    return {"hub": _hub_revision(cfg)}


def _nonce() -> str:
    import uuid

    return uuid.uuid4().hex


def _hub_revision(cfg: SourceSpec) -> str:
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(cfg.source, timeout=cfg.timeout_s).sha or "unknown"
    except Exception as exc:
        raise DownloadError(
            f"{cfg.source}: hub dataset unavailable ({type(exc).__name__}); "
            "check the id, your network, or use a local file / URL"
        ) from None


def fetch_url(cfg: SourceSpec, dest: Path) -> Path:
    import httpx

    name = Path(cfg.source.split("?", 1)[0]).name or "data.json"
    if Path(name).suffix.lower() not in SUPPORTED:
        name += ".json"
    target = dest / name
    h = hashlib.sha256()
    size = 0
    try:
        with httpx.stream("GET", cfg.source, timeout=cfg.timeout_s, follow_redirects=True) as resp:
            if resp.status_code >= 400:
                raise DownloadError(f"{cfg.source}: HTTP {resp.status_code}")
            ctype = resp.headers.get("content-type", "")
            if "text/html" in ctype:
                raise DownloadError(f"{cfg.source}: server returned HTML, not data ({ctype})")
            length = resp.headers.get("content-length", "")
            if length.isdigit() and int(length) > cfg.max_bytes:
                raise DownloadError(
                    f"{cfg.source}: {length} bytes is larger than data.max_bytes={cfg.max_bytes}"
                )
            with open(target, "wb") as fh:
                for chunk in resp.iter_bytes():
                    if size == 0 and _looks_like_html(chunk):
                        # Error pages and login walls are often served as text/plain or JSON.
                        raise DownloadError(f"{cfg.source}: server returned an HTML page, not data")
                    size += len(chunk)
                    if size > cfg.max_bytes:
                        raise DownloadError(
                            f"{cfg.source}: larger than data.max_bytes={cfg.max_bytes}"
                        )
                    h.update(chunk)
                    fh.write(chunk)
    except httpx.HTTPError as exc:
        raise DownloadError(f"{cfg.source}: {type(exc).__name__}: {exc}") from None
    if cfg.sha256 and h.hexdigest() != cfg.sha256.lower():
        raise DownloadError(f"{cfg.source}: sha256 {h.hexdigest()[:12]}… does not match the pin")
    return target


def _looks_like_html(chunk: bytes) -> bool:
    head = chunk[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def fetch_hub(cfg: SourceSpec, dest: Path) -> Path:
    # Asking for the revision first fails in under a second for a bad id or no network;
    # load_dataset alone retries for ~25 s first. It also pins what gets loaded.
    revision = _hub_revision(cfg)
    try:
        import datasets

        ds = datasets.load_dataset(
            cfg.source,
            cfg.hub_config,
            split=cfg.hub_split,
            revision=None if revision == "unknown" else revision,
        )
    except Exception as exc:
        raise DownloadError(
            f"{cfg.source}: could not load from the Hugging Face hub "
            f"({type(exc).__name__}); check the id and network, or download it to a file"
        ) from None
    target = dest / f"{cfg.source.replace('/', '__')}.jsonl"
    ds.to_json(str(target), lines=True, force_ascii=False)
    return target


def download(cfg: SourceSpec, stage: str = "download") -> ArtifactRef:
    """`stage`: download/<name> for one of several `data.sources`."""
    kind = source_kind(cfg.source)

    def write(tmp: Path) -> dict[str, Any]:
        data = tmp / "data"
        data.mkdir()
        if kind == "builtin" and cfg.source in BUILTIN_FILES:
            shutil.copyfile(BUILTIN_FILES[cfg.source], data / BUILTIN_FILES[cfg.source].name)
        elif kind == "builtin":
            if cfg.source != "builtin:demo":
                known = ", ".join(BUILTIN_DATASETS)
                raise DownloadError(f"{cfg.source}: unknown builtin dataset (one of {known})")
            try:
                rows = demo_data.generate(cfg.demo_rows, cfg.demo_seed)
            except demo_data.DemoDataError as exc:
                raise DownloadError(str(exc)) from None
            with open(data / "demo.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif kind == "local":
            src = Path(cfg.source)
            for f in local_files(cfg.source):
                rel = f.name if src.is_file() else f.relative_to(src).as_posix()
                (data / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, data / rel)
        elif kind == "url":
            fetch_url(cfg, data)
        else:
            fetch_hub(cfg, data)
        files = sorted(p for p in data.rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files)
        source = {"source": cfg.source, "kind": kind, "files": [p.name for p in files]}
        (tmp / "source.json").write_text(json.dumps(source, indent=1))
        return {
            "figures": {"bytes": total, "files": len(files)},
            "params": {"source": cfg.source, "kind": kind},
            "log_files": ["source.json"],
            "summary": f"{len(files)} file(s), {total / 1e6:.2f} MB from {kind}",
        }

    return write_artifact(stage, write)


download_task = stage_task("download", key_extra=lambda inputs: fingerprint(inputs["cfg"]))(
    download
)
