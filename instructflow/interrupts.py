"""Ctrl-C and SIGTERM: stop cleanly, say where, and leave everything resumable.

- The CLI turns SIGTERM into the same KeyboardInterrupt as Ctrl-C (inside a flow run Prefect's
  own handler raises its TerminationSignal instead; `is_interrupt` counts both), so both
  unwind through the same cleanup: the stage's Prefect task run and the flow run end Crashed
  (the workspace's Prefect server, in its own session, survives the signal and records it),
  the MLflow run ends KILLED, and the CLI prints one line and exits 130.
- During training the first signal is a request: the run finishes its current step, saves a
  checkpoint if a step finished since the last one, and stops; `Interrupted` then carries the
  step to resume from. A second signal interrupts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Not part of stage code digests (instructflow.codeid): it changes when a run stops, not what
# a finished stage writes.
OUTPUT_NEUTRAL = True
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; `stage` and `checkpoint_step` say where it can resume."""

    def __init__(self, stage: str, checkpoint_step: int | None = None):
        self.stage = stage
        self.checkpoint_step = checkpoint_step
        super().__init__(self.line())

    def line(self) -> str:
        where = f"interrupted during {self.stage}"
        if self.checkpoint_step:
            return f"{where} (checkpoint at step {self.checkpoint_step}; run again to resume)"
        return f"{where} (run again: finished stages are Cached)"


def is_interrupt(exc: BaseException | type[BaseException] | None) -> bool:
    """A signal's unwinding: KeyboardInterrupt, or the TerminationSignal Prefect's flow engine
    raises for a SIGTERM that arrives inside a flow run (it replaces our handler there)."""
    kind = exc if isinstance(exc, type) else type(exc)
    if exc is None or not issubclass(kind, BaseException):
        return False
    if issubclass(kind, KeyboardInterrupt):
        return True
    prefect_exceptions = sys.modules.get("prefect.exceptions")  # loaded if a flow ran
    signal_type = getattr(prefect_exceptions, "TerminationSignal", None)
    return signal_type is not None and issubclass(kind, signal_type)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """SIGTERM (e.g. `kill`, a scheduler stopping the job) unwinds like Ctrl-C."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


class StopRequest:
    """Set by the first SIGINT/SIGTERM inside `requested_stop()`; polled at safe points."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def requested_stop() -> Iterator[StopRequest]:
    """Within the block, the first SIGINT/SIGTERM sets the yielded request instead of
    raising; the next one raises KeyboardInterrupt at once. Only in the main thread (signals
    are delivered there); elsewhere the request is never set and signals behave as before."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request:
            raise KeyboardInterrupt
        request.signum = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
