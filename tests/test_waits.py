"""A run meeting another run's per-user cache build (instructflow.waits): the wait is shown
on its row with seconds that tick, and a lock held past its limit ends in one line. The locks
are held by a real second process, as a second first run meets them."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructflow import cli, progress, waits, workspace
from instructflow.builtin import gguf
from instructflow.builtin import model as builtin

# Takes every lock named on its command line, says "held", then holds them until stdin
# closes, or, with --build SRC DST SECONDS, builds DST (a copy of SRC) SECONDS later and lets
# go: what another run's finished build leaves behind.
HOLDER = """
import shutil, sys, time
from filelock import FileLock
args = sys.argv[1:]
build = args[args.index("--build") + 1 :] if "--build" in args else None
locks = [FileLock(p) for p in (args[: args.index("--build")] if build else args)]
for lock in locks:
    lock.acquire()
print("held", flush=True)
if build:
    time.sleep(float(build[2]))
    shutil.copytree(build[0], build[1])
else:
    sys.stdin.readline()
"""


def _hold(*args: str | Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.fixture
def session_tokenizer() -> Path:
    """The built-in tokenizer folder of the session's cache (its name is the cache key)."""
    return builtin.cached_tokenizer_dir()


@pytest.fixture
def session_bundle(session_tokenizer) -> Path:
    """The session's pre-trained builtin:tiny: what another run's build leaves behind."""
    return builtin.ensure_pretrained(session_tokenizer, arch=builtin.ARCH)[0]


@pytest.fixture
def empty_cache(session_tokenizer, session_bundle, tmp_path, monkeypatch) -> Path:
    """A user whose cache holds nothing yet (a first run); after the fixtures that read the
    session's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("INSTRUCTFLOW_CACHE", str(cache))
    return cache


def test_a_run_waiting_for_another_runs_base_model_says_so_and_its_seconds_tick(
    home, session_bundle, empty_cache, monkeypatch
):
    from rich.console import Console

    from instructflow.config import ModelConfig
    from tasks.base_model import prepare_base_model, prepare_tokenizer

    bundle = session_bundle  # stands for what the other run is pre-training
    tok_ref = prepare_tokenizer(ModelConfig())
    (empty_cache / "builtin").mkdir(parents=True, exist_ok=True)
    lock = empty_cache / "builtin" / f"{bundle.name}.lock"
    out = io.StringIO()
    view = cli.RunView(
        Console(file=out, soft_wrap=True, width=200), live=False, rows=["base_model", "train"]
    )
    monkeypatch.setattr(cli, "PLAIN_EVERY_S", 1.0)
    events: list[dict] = []

    def listen(event: str, payload: dict) -> None:
        if event == "waiting":
            events.append(payload)

    holder = _hold(lock, "--build", bundle, empty_cache / "builtin" / bundle.name, 3.5)
    progress.subscribe(view)
    progress.subscribe(listen)
    try:
        progress.notify("stage_started", stage="base_model")
        t0 = time.monotonic()
        ref = prepare_base_model(ModelConfig(), tok_ref)
        waited = time.monotonic() - t0
    finally:
        progress.unsubscribe(listen)
        progress.unsubscribe(view)
        holder.wait(timeout=30)
    assert 3 < waited < 10
    # Loaded from what the other run built, not pre-trained again.
    assert json.loads(ref.file("model.json").read_text())["pretrain"]["cache_key"] == bundle.name
    said = [e["message"] for e in events if not e.get("done")]
    first = (
        f"waiting for another run building builtin:tiny (lock {lock}), 0 s so far, "
        "gives up after 3600 s"
    )
    assert said[0] == first
    so_far = [int(re.search(r"(\d+) s so far", m).group(1)) for m in said]
    assert so_far == sorted(so_far) and so_far[-1] >= 3  # once a second, counting up
    assert events[-1]["done"] is True
    # The plain view: a line on the base_model row at the start and every PLAIN_EVERY_S.
    lines = [ln for ln in out.getvalue().splitlines() if "waiting for another run" in ln]
    assert lines[0] == f"base_model Running   {first}"
    assert len(lines) >= 3 and "3 s so far" in lines[-1]
    assert "base_model" not in view.step  # the wait's text goes once it is over


def test_the_live_view_redraws_a_running_stages_seconds_between_events():
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    view = cli.RunView(console, live=True, rows=["tokenize", "base_model"])

    def seconds() -> float:
        text = Console(file=io.StringIO(), width=200)
        with text.capture() as cap:
            text.print(view.live.renderable)
        return float(re.search(r"base_model\s*│\s*Running\s*│\s*([\d.]+)", cap.get()).group(1))

    with view:
        view("stage_started", {"stage": "base_model"})
        before = seconds()
        time.sleep(1.2)
        # No event in between: what Live draws at its next refresh still moved on.
        assert seconds() >= before + 1


def _locks(cache: Path, tokenizer: Path, tmp_path: Path) -> dict[str, tuple]:
    """(lock path, the call meeting it, what its line says) per per-user cache build."""
    from instructflow import layer_pruning

    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"GGUF but only the bytes the lock's key needs")
    gguf_dir = gguf.target_dir(gguf.file_sha256(fake_gguf), "model")
    key = hashlib.sha256(json.dumps(["identity", 2]).encode()).hexdigest()[:24]
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    return {
        "tokenizer": (
            cache / "builtin" / f"{tokenizer.name}.lock",
            builtin.cached_tokenizer_dir,
            "building the built-in tokenizer",
        ),
        "base model": (
            cache / "builtin" / f"{builtin.cache_key(tokenizer, None, builtin.ARCH)}.lock",
            lambda: builtin.ensure_pretrained(tokenizer, arch=builtin.ARCH),
            "building builtin:tiny",
        ),
        "gguf": (
            gguf_dir.parent / f"{gguf_dir.name}.lock",
            lambda: gguf.converted(fake_gguf),
            "converting model.gguf",
        ),
        "pruned student": (
            layer_pruning.root() / f"student-2L-{key}.lock",
            lambda: layer_pruning.pruned(tmp_path / "student", "identity", 2),
            "pruning student to 2 layers",
        ),
        "mlflow store": (
            Path(f"{db}.lock"),
            lambda: workspace.ensure_mlflow_store(f"sqlite:///{db}"),
            f"creating the MLflow store {db}",
        ),
    }


def test_every_cache_lock_held_past_its_limit_fails_in_one_line_naming_it(
    session_tokenizer, empty_cache, tmp_path, monkeypatch
):
    monkeypatch.setenv(waits.LIMIT_ENV, "1")
    for folder in ("builtin", "gguf", "pruned"):
        (empty_cache / folder).mkdir(parents=True, exist_ok=True)
    sites = _locks(empty_cache, session_tokenizer, tmp_path)
    holder = _hold(*(lock for lock, _, _ in sites.values()))
    try:
        for name, (lock, call, what) in sites.items():
            t0 = time.monotonic()
            with pytest.raises((waits.LockTimeout, gguf.GGUFError)) as err:
                call()
            assert 1 <= time.monotonic() - t0 < 5, name
            assert str(err.value) == (
                f"gave up after 1 s waiting for another run {what}: lock {lock} is still held; "
                f"let that run finish (`fuser -v {lock}` shows its process) or stop it, then "
                "run again (INSTRUCTFLOW_LOCK_WAIT_S=<seconds> waits longer)"
            ), name
    finally:
        _release(holder)
    # Once the other run lets go, the same call goes through (the tokenizer: built in ~1 s).
    assert (builtin.cached_tokenizer_dir() / "tokenizer.json").is_file()
