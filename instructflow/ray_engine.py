"""`engine: ray`: a data stage's per-batch work as Ray tasks on a cluster.

The stage cuts its batches exactly as the local engine does and runs the same function on
each; results come back in batch order, so the artifact is byte-identical to the local one
(tested on a real two-node cluster). Workers must run the same instructflow code: each task
checks the digest of its function's module (instructflow.codeid) against the driver's and
fails in one line if they differ, instead of writing an artifact the cache key does not
describe. Large shared inputs (the tokenizer) go to the object store once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from instructflow.config import RayConfig

# Its code changes no stage's output: the engine is proven to give the local result.
OUTPUT_NEUTRAL = True


class RayEngineError(RuntimeError):
    """The cluster cannot run the work; the message is one line."""


def connect(cfg: RayConfig) -> None:
    """Join the cluster at cfg.address (or start a Ray on this machine when it is null)."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(
            address=cfg.address,
            log_to_driver=False,
            configure_logging=False,
            include_dashboard=False if cfg.address is None else None,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = cfg.address or "a local Ray"
        raise RayEngineError(f"ray.address={where}: cannot connect ({exc})") from None


@functools.cache
def _code_digest(module_file: str) -> str:
    from instructflow import codeid

    return codeid.digest(module_file)


def _run(fn: Callable, driver_code: str, batch: Any, shared: tuple) -> tuple[Any, str]:
    """One task: (fn(batch, *shared), this node's id)."""
    import ray

    here = _code_digest(inspect.getsourcefile(fn))
    if here != driver_code:
        raise RayEngineError(
            f"{fn.__module__}: this Ray worker runs other instructflow code than the driver "
            f"(digest {here[:12]} vs {driver_code[:12]}); install the same version on the cluster"
        )
    return fn(batch, *shared), ray.get_runtime_context().get_node_id()


def map_batches(
    fn: Callable, batches: Sequence[Any], shared: tuple, cfg: RayConfig
) -> tuple[list[Any], int]:
    """[fn(batch, *shared) for batch in batches] as Ray tasks, in batch order, and the number
    of cluster nodes that ran them."""
    import ray

    connect(cfg)
    # SPREAD: batches are independent, so use every node rather than fill one first.
    task = ray.remote(num_cpus=cfg.num_cpus_per_task, max_retries=2, scheduling_strategy="SPREAD")(
        _run
    )
    code = _code_digest(inspect.getsourcefile(fn))
    shared_ref = ray.put(shared)
    futures = [task.remote(fn, code, batch, shared_ref) for batch in batches]
    try:
        done = ray.get(futures)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        raise (cause if isinstance(cause, RayEngineError) else exc) from None
    return [result for result, _ in done], len({node for _, node in done})
