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

    # Computed here, not by Trainer: kept in its log_history too, so a checkpoint's
    # trainer_state.json holds them for a resumed run's whole curve (replay).
    DERIVED = ("useful_tokens_per_s", "useful_tokens", "padding_fraction")
    EVAL = ("eval_loss", "eval_exact_match", "eval_rougeL", "eval_generation_s")

    def replay(self, state) -> None:
        """A resumed training's earlier steps, from the checkpoint's log history (Trainer
        restores it before `on_train_begin`): the curves are whole, not cut at the resume."""
        if self.series or not state.global_step:
            return
        for entry in state.log_history:
            step = entry.get("step", 0)
            if step > state.global_step:
                continue
            for src, name in self.KEYS.items():
                if src in entry and "train_runtime" not in entry:
                    self._add(name, step, entry[src])
            for name in (*self.EVAL, *self.DERIVED):
                if name in entry:
                    self._add(name, step, entry[name])

    def on_train_begin(self, args, state, control, **kw):
        self.replay(state)
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
        for name in self.EVAL:
            if name in logs:
                self._add(name, step, logs[name])
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
            if state.log_history and state.log_history[-1].get("step") == step:
                state.log_history[-1].update(
                    {
                        k: self.series[k][-1][1]
                        for k in self.DERIVED
                        if self.series.get(k, [[None]])[-1][0] == step
                    }
                )


class Progress(TrainerCallback):
    """Live progress (step/total, loss, useful tokens/s, ETA) and live metrics: in-process
    listeners, or stdout lines the parent forwards (torchrun). The pipeline logs each
    `stage_metrics` event to the MLflow run as it arrives, so the UI draws the loss curve
    while training runs."""

    def __init__(self, metrics: StepMetrics, subprocess_mode: bool = False, stage: str = "train"):
        self.metrics = metrics
        self.subprocess_mode = subprocess_mode
        self.stage = stage  # distill and distill_baseline train through here too
        self.loss: float | None = None
        self._t0: float | None = None
        self._step0 = 0
        self._sent: dict[str, int] = {}  # series -> last step sent (on_log fires several
        # times per step: train loss, eval, the end-of-training summary)

    def _emit(self, event: str, **payload: Any) -> None:
        if self.subprocess_mode:
            print(PROGRESS_PREFIX + json.dumps({"event": event, **payload}), flush=True)
            sys.stdout.flush()
        else:
            progress.notify(event, **payload)

    def on_train_begin(self, args, state, control, **kw):
        self._t0, self._step0 = time.perf_counter(), state.global_step
        if not state.is_world_process_zero:
            return
        # A resumed run's earlier steps go to its MLflow run too: one whole loss curve.
        self.metrics.replay(state)
        earlier: dict[int, dict[str, float]] = {}
        for name, points in self.metrics.series.items():
            for step, value in points:
                earlier.setdefault(int(step), {})[name] = value
                self._sent[name] = int(step)
        for step in sorted(earlier):
            self._emit("stage_metrics", stage=self.stage, step=step, metrics=earlier[step])

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero:
            return
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
        step = state.global_step
        latest = {
            k: v[-1][1]
            for k, v in self.metrics.series.items()
            if v and v[-1][0] == step and self._sent.get(k) != step
        }
        self._sent.update(dict.fromkeys(latest, step))
        if latest:
            self._emit("stage_metrics", stage=self.stage, step=step, metrics=latest)

    def on_step_end(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        parts = [f"loss {self.loss:.3f}"] if self.loss is not None else ["training"]
        rate = self.metrics.series.get("useful_tokens_per_s")
        if rate:
            parts.append(f"{rate[-1][1]:,.0f} tok/s")
        done = state.global_step - self._step0
        if self._t0 is not None and done > 0 and state.max_steps:
            per_step = (time.perf_counter() - self._t0) / done
            parts.append(f"ETA {per_step * (state.max_steps - state.global_step):.0f} s")
        self._emit(
            "stage_progress",
            stage=self.stage,
            completed=state.global_step,
            total=state.max_steps,
            message=", ".join(parts),
        )


class GracefulStop(TrainerCallback):
    """On the first SIGINT/SIGTERM (instructflow.interrupts.requested_stop), finish the step,
    save a checkpoint if a step finished since the last one, and stop training."""

    def __init__(self, request):
        self.request = request
        self.saved_step = 0
        self.stopped_at: int | None = None

    def on_save(self, args, state, control, **kw):
        self.saved_step = state.global_step

    def on_step_end(self, args, state, control, **kw):
        if self.request and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_save = state.global_step > self.saved_step
            control.should_training_stop = True
        return control


def forward_progress_line(line: str) -> bool:
    """Parent side of `Progress(subprocess_mode=True)`; True if the line was a progress one."""
    if not line.startswith(PROGRESS_PREFIX):
        return False
    try:
        payload = json.loads(line[len(PROGRESS_PREFIX) :])
    except ValueError:
        return False
    progress.notify(payload.pop("event", "stage_progress"), **payload)
    return True
