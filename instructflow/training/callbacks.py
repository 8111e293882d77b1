"""Trainer callbacks: per-step figures for MLflow (via the manifest) and live CLI progress."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from transformers import TrainerCallback

from instructflow import progress
from instructflow.training.packing import BatchStats

PROGRESS_PREFIX = "INSTRUCTFLOW_PROGRESS "


class StepMetrics(TrainerCallback):
    """Collects loss / lr / grad norm / eval loss from Trainer logs and adds throughput.

    `useful_tokens_per_s` counts loss-bearing tokens only; `padding_fraction` is the share
    of batch slots that are padding (0 when packed). Both cover the steps since the last log.
    """

    KEYS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm"}

    def __init__(self, stats: BatchStats, world_size: int = 1):
        self.stats = stats
        self.world_size = world_size
        self.series: dict[str, list[list[float]]] = {}
        self._window = {"positions": 0, "tokens": 0, "useful": 0}
        self._t = time.perf_counter()

    def _add(self, name: str, step: int, value: float) -> None:
        self.series.setdefault(name, []).append([step, float(value)])

    def on_train_begin(self, args, state, control, **kw):
        self.stats.drain()
        self._window = {"positions": 0, "tokens": 0, "useful": 0}
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        used = self.stats.pop(args.gradient_accumulation_steps)
        for k, v in used.items():
            self._window[k] += v

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        step = state.global_step
        for src, name in self.KEYS.items():
            if src in logs:
                self._add(name, step, logs[src])
        if "eval_loss" in logs:
            self._add("eval_loss", step, logs["eval_loss"])
        if "loss" in logs:
            counts, self._window = self._window, {"positions": 0, "tokens": 0, "useful": 0}
            now = time.perf_counter()
            # Evaluation time inside the window is not training time.
            dt = max(now - self._t - self.stats.excluded_s, 1e-9)
            self._t, self.stats.excluded_s = now, 0.0
            # Every rank sees a different shard of the same size: scale rank 0's count.
            useful = counts["useful"] * self.world_size
            self._add("useful_tokens_per_s", step, useful / dt)
            self._add("useful_tokens", step, useful)
            if counts["positions"]:
                pad = 1 - counts["tokens"] / counts["positions"]
                self._add("padding_fraction", step, pad)


class Progress(TrainerCallback):
    """Live progress: in-process listeners, or stdout lines the parent forwards (torchrun)."""

    def __init__(self, subprocess_mode: bool = False):
        self.subprocess_mode = subprocess_mode
        self.loss: float | None = None

    def _emit(self, **payload: Any) -> None:
        if self.subprocess_mode:
            print(PROGRESS_PREFIX + json.dumps(payload), flush=True)
            sys.stdout.flush()
        else:
            progress.notify("stage_progress", **payload)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        msg = f"loss {self.loss:.3f}" if self.loss is not None else "training"
        self._emit(stage="train", completed=state.global_step, total=state.max_steps, message=msg)


def forward_progress_line(line: str) -> bool:
    """Parent side of `Progress(subprocess_mode=True)`; True if the line was a progress one."""
    if not line.startswith(PROGRESS_PREFIX):
        return False
    try:
        payload = json.loads(line[len(PROGRESS_PREFIX) :])
    except ValueError:
        return False
    progress.notify("stage_progress", **payload)
    return True
