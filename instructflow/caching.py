"""Cross-run stage caching on top of Prefect.

Prefect's DEFAULT policy includes the flow-run id and never hits across runs. A stage's key
here is exactly: the stage name, the digest of the stage's code (its module and every project
module it imports, transitively: instructflow.codeid), the digests of its input artifacts
(not their paths), and the JSON of the config sections it receives. Before Prefect is allowed
to hit, the cached artifact is re-hashed: a corrupted or half-written one has its cache record
removed and is quarantined (`.corrupt-*`, whatever digest the recompute then gives), so the
stage recomputes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from instructflow import codeid
from instructflow.artifacts import ArtifactRef, is_valid

# Its code changes no stage's output (instructflow.codeid does not follow it).
OUTPUT_NEUTRAL = True

log = logging.getLogger("instructflow.cache")


def canonical(value: Any) -> Any:
    """A JSON-able, deterministic view of a stage input; artifacts count by digest only."""
    if isinstance(value, ArtifactRef):
        return {"artifact": value.stage, "digest": value.digest}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude=key_neutral(value) or None)
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def key_neutral(model: BaseModel) -> dict[str, Any]:
    """model_dump's `exclude` for the fields a section marks KEY_NEUTRAL (settings that change
    where or how a stage runs, never its output), nested sections included."""
    out: dict[str, Any] = {name: True for name in getattr(model, "KEY_NEUTRAL", ())}
    for name in type(model).model_fields:
        child = getattr(model, name)
        if name not in out and isinstance(child, BaseModel) and (sub := key_neutral(child)):
            out[name] = sub
    return out


def local_files_digest(paths: Iterable[str | Path | None]) -> dict[str, str]:
    """{path: sha256 of its contents} for the local files and folders among `paths` (hub ids
    and unset values are skipped): files a config names, whose edits must miss the cache."""
    out: dict[str, str] = {}
    for raw in paths:
        if not raw or not Path(raw).exists():
            continue
        root = Path(raw)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() if root.is_dir() else b"")
            h.update(f.read_bytes())
        out[str(raw)] = h.hexdigest()
    return out


def inputs_key(stage: str, code: str, inputs: dict[str, Any], exclude: Iterable[str] = ()) -> str:
    skip = set(exclude)
    payload = {
        "stage": stage,
        "code": code,
        "inputs": canonical({k: v for k, v in inputs.items() if k not in skip}),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:40]}"


def _record_path(store: Any, key: str) -> Path | None:
    resolve = getattr(getattr(store, "result_storage", None), "_resolve_path", None)
    return Path(resolve(key)) if resolve is not None else None


def _cached_ref(store: Any, key: str) -> ArtifactRef | None | bool:
    """The ArtifactRef Prefect stored under `key`; None if no record, False if unreadable."""
    if store is None or not store.exists(key):
        return None
    try:
        value = store.read(key).result
    except Exception:
        return False
    return value if isinstance(value, ArtifactRef) else None


def _quarantine_published(ref: ArtifactRef) -> None:
    """Move a corrupt published artifact aside now: a recompute that gives another digest
    (training's figures hold timings) would otherwise leave it published where other readers
    (serve, a registry copy, `ls artifacts/`) take it for good."""
    from instructflow.artifacts import quarantine

    path = ref.dir
    if path.name != ref.digest or not path.is_dir():
        return  # not a published artifact dir (or already gone)
    try:
        quarantine(path)
    except OSError:  # moved by a concurrent run meanwhile: it is aside either way
        pass


def _make_policy_class():
    from prefect.cache_policies import CachePolicy

    @dataclass
    class StageCachePolicy(CachePolicy):
        stage: str = ""
        code: str = ""
        exclude: list[str] = field(default_factory=list)
        key_extra: Callable[[dict[str, Any]], Any] | None = None

        def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
            extra: dict[str, Any] = {}
            if self.key_extra is not None:
                try:
                    extra = {"__extra__": self.key_extra(inputs)}
                except Exception:
                    # The task itself will meet the same problem and report it in one line.
                    import uuid

                    extra = {"__extra__": uuid.uuid4().hex}
            key = inputs_key(self.stage, self.code, {**inputs, **extra}, self.exclude)
            store = getattr(task_ctx, "result_store", None)
            cached = _cached_ref(store, key)
            if cached is False or (isinstance(cached, ArtifactRef) and not is_valid(cached)):
                # Never trust a record whose artifact no longer hashes to its digest.
                msg = f"{self.stage}: cached artifact failed its digest check; recomputing"
                log.warning(msg)
                from instructflow import progress

                progress.notify("warning", stage=self.stage, message=msg)
                record = _record_path(store, key)
                if record is not None:
                    record.unlink(missing_ok=True)
                    store.cache.pop(str(record), None)
                if isinstance(cached, ArtifactRef):
                    _quarantine_published(cached)
            return key

    return StageCachePolicy


def stage_task(
    name: str,
    *,
    exclude: Iterable[str] = (),
    key_extra: Callable[[dict[str, Any]], Any] | None = None,
    cache: bool = True,
    **task_kwargs: Any,
) -> Callable[[Callable[..., ArtifactRef]], Any]:
    """Wrap a stage's plain function as a Prefect task with the stage cache policy.

    `exclude`: inputs that do not change the output (e.g. a live MLflow run id).
    `key_extra(inputs)`: more key material that is not an input, e.g. the download source's
    current fingerprint, so a changed source misses the cache.
    `cache=False`: stages that read live state (register) always run.
    """
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def wrap(fn: Callable[..., ArtifactRef]):
        if cache:
            code = codeid.digest(inspect.getsourcefile(fn))
            policy = _make_policy_class()(
                stage=name, code=code, exclude=list(exclude), key_extra=key_extra
            )
        else:
            policy = NO_CACHE
        return task(
            name=name,
            cache_policy=policy,
            persist_result=cache,
            **task_kwargs,
        )(fn)

    return wrap
