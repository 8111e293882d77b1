"""The demo's recipe on another pre-training of its base. (`make demo` itself, and the guard
that its tuned model beats the base, run in tests/test_readme_demo.py: the quick start trains
the demo once for both.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_demo_recipe_does_not_hang_on_one_lucky_base(tmp_path):
    """The demo's fine-tune on another pre-training of builtin:tiny: seed 2, the weakest of
    seeds 0-3 under the previous recipe (test exact match 0.53; bench/demo_seeds.py). The
    recipe must give every base at least 0.70 (README: 0.75-0.95 over seeds 0-3)."""
    from instructflow.builtin import model as builtin

    bundle, _ = builtin.ensure_pretrained(builtin.cached_tokenizer_dir(), recipe={"seed": 2})
    home, summary = tmp_path / "home", tmp_path / "summary.json"
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, "-m", "instructflow.cli", "run", "-c", "configs/demo.yaml", "--plain"]
    args += ["--set", f"model.name_or_path={bundle / 'model'}", "--set", "judge.backend=none"]
    args += ["--set", "register.enabled=false", "--summary-json", str(summary)]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(summary.read_text())["metrics"]
    assert m["evaluate/exact_match"] >= 0.70, m["evaluate/exact_match"]
    assert m["evaluate/base/exact_match"] <= 0.10
