"""Test setup: a throwaway workspace per test, a real Prefect server and real MLflow.

The environment is set before prefect/mlflow are imported: both read it on import. One real
Prefect server (instructflow.prefect_server, as `instructflow run` starts per workspace) serves
the whole session, in-process runs and CLI subprocesses alike, since starting one costs 10-20 s;
so is the per-user cache of the pre-trained built-in model; artifacts, result records and the
MLflow store are per test.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT))

_session_home = Path(tempfile.mkdtemp(prefix="instructflow-tests-"))
os.environ["INSTRUCTFLOW_HOME"] = str(_session_home / "home")
# The pre-trained builtin:tiny is built once per test session, before the first test (~2.5 min
# on 2 cores, outside any test's timeout), and shared by every test and CLI subprocess; never
# the user's own cache, so CI really builds it. INSTRUCTFLOW_TEST_CACHE reuses one across
# sessions while developing.
os.environ["INSTRUCTFLOW_CACHE"] = os.environ.get(
    "INSTRUCTFLOW_TEST_CACHE", str(_session_home / "cache")
)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from instructflow import workspace  # noqa: E402

workspace.configure()


def pytest_sessionstart(session) -> None:
    from instructflow import prefect_server
    from instructflow.model_specs import load_builtin

    os.environ["PREFECT_API_URL"] = prefect_server.ensure(_session_home)
    load_builtin()


def pytest_sessionfinish(session, exitstatus) -> None:
    from prefect.logging.handlers import APILogWorker

    from instructflow import prefect_server

    APILogWorker.drain_all(timeout=5)  # flow-run log lines still queued for the server
    prefect_server.stop(_session_home)
    # Any workspace server a test started and left (a test's own cache aside): none outlives
    # the session, and the count says whether a test forgets to stop its own.
    basetemp = session.config._tmp_path_factory.getbasetemp()
    left = [*prefect_server.stop_all(under=basetemp), *prefect_server.stop_all(_session_home)]
    if left:
        print(f"\nstopped {len(left)} Prefect server(s) that tests left running")
    # The check that none outlives the suite: a server that would not stop fails the session.
    still = [
        info
        for info in prefect_server.registered()
        if any(Path(info["home"]).is_relative_to(p) for p in (basetemp, _session_home))
    ]
    if still:
        print(f"\nPrefect server(s) still running after the tests: {still}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri(monkeypatch):
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ, which every later
    subprocess (a pipeline run, `serve`) would inherit: restored after each test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI", ""))
    if not os.environ["MLFLOW_TRACKING_URI"]:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh INSTRUCTFLOW_HOME for one test."""
    path = tmp_path / "home"
    monkeypatch.setenv("INSTRUCTFLOW_HOME", str(path))
    path.mkdir()
    import mlflow

    mlflow.set_tracking_uri(workspace.mlflow_db_uri())
    yield path
    if mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    return SHARED


@pytest.fixture
def train_inputs(home):
    """(tokenized, base, tokenizer) refs: the built-in tiny base and 80 demo rows at 64 tokens."""
    from tokenized_fixtures import write_tokenized

    from instructflow import demo_data
    from instructflow.config import ModelConfig
    from instructflow.loading import load_tokenizer
    from tasks.base_model import prepare_base_model, prepare_tokenizer

    tok_ref = prepare_tokenizer(ModelConfig())
    base = prepare_base_model(ModelConfig(), tok_ref)
    rows = demo_data.generate(80, seed=5)
    tok = load_tokenizer(tok_ref)
    tokenized = write_tokenized({"train": rows[:72], "validation": rows[72:]}, tok, max_length=64)
    return tokenized, base, tok_ref


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (fetched once per test session's cache)."""
    from instructflow.builtin import smollm2

    return smollm2.gguf_file()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct de-quantised into a transformers folder (once per session)."""
    from instructflow.builtin import smollm2

    return smollm2.model_dir()


@pytest.fixture(scope="session")
def tiny_gguf(smollm2_gguf, tmp_path_factory) -> Path:
    """A 2-layer random Llama as a GGUF file with SmolLM2's real tokenizer (tests/tiny_gguf)."""
    from tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(smollm2_gguf, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
