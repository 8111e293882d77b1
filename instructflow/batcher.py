"""The request queue of `instructflow serve` and the thread that answers it in batches."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple

from instructflow import streaming

log = logging.getLogger("instructflow.serve.access")
END = streaming.END
Sink = Callable[[int | None], None]


class QueueFull(RuntimeError):
    pass


class ShuttingDown(RuntimeError):
    pass


class Job(NamedTuple):
    prompt: list[int]  # token ids
    settings: dict[str, Any]
    future: Future
    sink: Sink | None  # hears each token id, then END


class Batcher:
    """Requests wait in a bounded FIFO; one worker thread answers them with the evaluate
    stage's continuous-batching decoder. Greedy requests with the same settings share a decode
    loop: those waiting when it starts, and those that arrive while it runs, which join as
    rows finish (at most max_batch rows at once); each is answered as soon as its row ends,
    and equals the answer to the same request sent alone (tested). A sampling request
    (temperature > 0) is answered alone: its random stream must not depend on the batch.
    Arrivals join a running loop only while the oldest waiting request has its settings, so a
    request with other settings waits for the rows already running, not for later arrivals.
    A batch that fails answers its unfinished requests again one at a time, so a request that
    cannot be answered fails alone. `stop()` ends it all: waiting and running requests fail
    with ShuttingDown, later ones are refused."""

    def __init__(self, chat, max_batch: int = 16, max_queue: int = 64):
        self.chat, self.max_batch, self.max_queue = chat, max_batch, max_queue
        self.pending: collections.deque[Job] = collections.deque()
        self.changed = threading.Condition()
        self.stopped = False
        threading.Thread(target=self._work, daemon=True, name="batcher").start()

    def submit(
        self, prompt: list[int], settings: dict[str, Any], sink: Sink | None = None
    ) -> Future:
        """A Future of (reply, requests that shared its decode loop) for a prepared request
        (ChatModel.prepare); QueueFull when max_queue requests are already waiting. `sink`, if
        given, hears the reply's token ids as they are generated, then END once the future is
        settled."""
        job = Job(prompt, settings, Future(), sink)
        with self.changed:
            if self.stopped:
                raise ShuttingDown("the server is shutting down")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"server busy: {len(self.pending)} requests queued (--max-queue)")
            self.pending.append(job)
            self.changed.notify()
        return job.future

    def stop(self) -> None:
        with self.changed:
            self.stopped = True
            waiting = list(self.pending)
            self.pending.clear()
        for job in waiting:
            _settle(job, ShuttingDown("the server is shutting down"))

    def _take(self, settings: dict[str, Any], room: int, skip_others: bool) -> list[Job]:
        """Up to `room` waiting jobs with `settings`, oldest first; past jobs with other
        settings (which keep their place) only if `skip_others`."""
        taken: list[Job] = []
        with self.changed:
            for job in list(self.pending):
                if len(taken) == room:
                    break
                if job.settings == settings:
                    self.pending.remove(job)
                    taken.append(job)
                elif not skip_others:
                    break
        return taken

    def _work(self) -> None:
        while True:
            with self.changed:
                while not self.pending:
                    self.changed.wait()
                first = self.pending.popleft()
            greedy = first.settings["temperature"] == 0
            more = self._take(first.settings, self.max_batch - 1, True) if greedy else []
            self._answer([first, *more], greedy)

    def _run(self, jobs: list[Job], greedy: bool, skip: collections.Counter) -> None:
        """One decode loop over `jobs` (and greedy arrivals); the first skip[i] tokens of job
        i are not passed on (its sink heard them from an earlier, failed loop)."""
        settings = jobs[0].settings
        heard: collections.Counter = collections.Counter()

        def admit(room: int) -> list[list[int]]:
            arrived = self._take(settings, room, skip_others=False) if greedy else []
            jobs.extend(arrived)
            return [job.prompt for job in arrived]

        def on_token(index: int, token: int) -> None:
            if self.stopped:  # generate stops here; every row still running hears why
                raise ShuttingDown("the server is shutting down")
            heard[index] += 1
            if jobs[index].sink is not None and heard[index] > skip[index]:
                jobs[index].sink(token)

        def on_done(index: int, out: dict[str, Any]) -> None:
            _settle(jobs[index], (self.chat.reply(out), len(jobs)))

        try:
            self.chat.run(
                [job.prompt for job in jobs],
                settings,
                batch_size=self.max_batch,
                on_token=on_token,
                admit=admit if greedy else None,
                on_done=on_done,
            )
        finally:
            skip |= heard  # what each sink has heard in all (a max per job)

    def _answer(self, jobs: list[Job], greedy: bool) -> None:
        heard: collections.Counter = collections.Counter()
        try:
            self._run(jobs, greedy, heard)
            return
        except Exception as exc:
            left = [(i, job) for i, job in enumerate(jobs) if not job.future.done()]
            if len(jobs) == 1 or isinstance(exc, ShuttingDown):
                for _, job in left:
                    _settle(job, exc)
                return
            log.warning(
                f"a batch of {len(jobs)} requests failed ({type(exc).__name__}: "
                f"{str(exc)[:200]}); answering its {len(left)} unfinished ones one at a time"
            )
        for i, job in left:  # greedy: alone, each answer is the one it would have had
            skip = collections.Counter({0: heard[i]})
            try:
                self._run([job], greedy, skip)
            except Exception as exc:
                _settle(job, exc)


def _settle(job: Job, outcome: Any) -> None:
    """Give `job` its result (or exception), then tell its sink the stream is over."""
    if job.future.done():
        return
    if isinstance(outcome, BaseException):
        job.future.set_exception(outcome)
    else:
        job.future.set_result(outcome)
    if job.sink is not None:
        job.sink(END)
