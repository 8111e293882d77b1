"""The command line itself: every option explained, --version, presets by name from any
directory, and input errors reported before anything starts."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli(cwd: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_option_of_every_command_has_help():
    from instructflow.cli import build_parser

    def walk(parser: argparse.ArgumentParser, where: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{where} {name}")
            elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
                assert action.help, f"{where}: {action.option_strings or action.dest} has no help"

    walk(build_parser(), "instructflow")


def test_version_and_input_errors_before_anything_starts(tmp_path):
    home = tmp_path / "home"
    version = _cli(tmp_path, home, "--version")
    assert version.returncode == 0 and version.stdout.startswith("instructflow ")

    missing = _cli(tmp_path, home, "run", "--set", f"data.source={tmp_path / 'nope.jsonl'}")
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file or " + (
        "directory (and not a hub dataset id)"
    )
    no_config = _cli(tmp_path, home, "run", "-c", "nope.yaml")
    assert no_config.returncode == 2 and "nope.yaml: config file not found" in no_config.stderr
    # Neither started a Prefect server nor created a tracking store.
    assert not (home / "prefect" / "server.json").exists() and not (home / "mlflow.db").exists()


def test_presets_resolve_from_any_directory(tmp_path):
    """`-c demo` (and the default config) name the project's presets, wherever you are."""
    from instructflow.cli import resolve_config

    demo = (ROOT / "configs" / "demo.yaml").resolve()
    assert Path(resolve_config("demo")) == demo
    assert Path(resolve_config("configs/demo.yaml")).resolve() == demo
    here = tmp_path / "mine.yaml"
    here.write_text("split: {seed: 3}\n")
    assert resolve_config(str(here)) == str(here)
    run = _cli(tmp_path, tmp_path / "home", "run", "-c", "demo", "--until", "download", "--plain")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "download  Completed" in run.stdout
