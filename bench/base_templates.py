"""Which prompt format suits the untuned base? The base model's greedy answers to the real-model
config's held-out test rows, rendered in each template, scored like the evaluate stage.

    python bench/base_templates.py [--config smollm2-ch07] [--templates alpaca,chat_template]

The real-model figures compare base and tuned in one template (the config's): this shows
whether that template handicaps the base. It runs the config's data stages (Cached after the
first run) in a throwaway workspace, then scores the base alone per template with
tasks/evaluate.score_model's decoding. Writes bench/results/base_templates.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_rows(config: str) -> tuple[Path, list[dict]]:
    home = Path(tempfile.mkdtemp(prefix="bench-templates-")) / "home"
    env = {**os.environ, "INSTRUCTFLOW_PREFECT_SERVER": "0"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "run", "--plain"]
    subprocess.run([*cmd, "-c", config, "--until", "split"], cwd=ROOT, env=env, check=True)
    split = next((home / "artifacts" / "split").glob("*/test.jsonl"))
    rows = [json.loads(line) for line in split.read_text().splitlines() if line.strip()]
    return home, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="smollm2-ch07")
    ap.add_argument("--templates", default="alpaca,chat_template")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "base_templates.md"))
    args = ap.parse_args()

    from instructflow import generation, model_specs, templates
    from instructflow.cli import resolve_config
    from instructflow.config import load_config
    from instructflow.metrics import text_metrics

    cfg = load_config(resolve_config(args.config), [])
    _, rows = test_rows(args.config)
    model, tok, _ = model_specs.load_for_inference(cfg.model.name_or_path)
    refs = [templates.reference(r) for r in rows]
    lines = [
        f"# The untuned base per prompt template (`python bench/base_templates.py --config "
        f"{args.config}`)",
        "",
        f"Base {cfg.model.name_or_path}, {len(rows)} held-out test rows of {cfg.data.source}, "
        f"greedy, max_new_tokens {cfg.evaluate.max_new_tokens}; {platform.machine()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.",
        "",
        "| template | ROUGE-L F1 | exact match | BLEU | mean answer words | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for template in args.templates.split(","):
        prompts = [templates.generation_prompt(r, template, tok) for r in rows]
        t0 = time.perf_counter()
        outs = generation.generate(
            model,
            tok,
            prompts,
            max_new_tokens=cfg.evaluate.max_new_tokens,
            batch_size=cfg.evaluate.batch_size,
            stop_strings=templates.stop_strings(template, tok),
            stop_tokens=[templates.end_of_turn_token(template, tok)],
            add_special_tokens=templates.add_special_tokens(template),
        )
        seconds = time.perf_counter() - t0
        scores, _ = text_metrics(outs, refs)
        words = sum(len(o.split()) for o in outs) / len(outs)
        lines.append(
            f"| {template} | {scores['rougeL']:.3f} | {scores['exact_match']:.2f} "
            f"| {scores['bleu']:.1f} | {words:.1f} | {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
    ref_words = sum(len(r.split()) for r in refs) / len(refs)
    lines += ["", f"References: {ref_words:.1f} words on average."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
