"""The fine-tuned model in the MLflow registry: a pyfunc around the adapter, and the gate.

What a registered model holds (`artifacts/` of the MLflow model):
  train/   the train artifact's adapter/ (or model/ for method=full), tokenizer/ (with the chat
           template) and train.json (method, template, base model.json) — no checkpoints, no
           merged copy;
  base/    the base-model artifact's model.json: a *reference* to the base weights — a hub id
           + pinned revision, or an absolute local path + content digest. Only for
           `builtin:tiny`, whose weights exist nowhere but the workspace, base/ also carries
           weights/ (1.3M parameters).
  card/    MODEL_CARD.md.
Why pyfunc and not the transformers flavour: with mlflow 3.17 a PEFT model whose base is a
local folder reloads with random base weights, a 4-bit base fails to reload, and the flavour
wants torchvision. Loading goes through the same code as training's own loader, so the
registry model's logits equal the trained model's.

`load_for_inference(uri_or_path)` is the one loader for generate/serve: `models:/NAME@alias`,
`runs:/...`, a train artifact dir, or an adapter dir.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from instructflow.artifacts import MANIFEST, ArtifactRef

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG = "instructflow.metric."
SPLIT_TAG = "instructflow.test_split_digest"
DECISION_TAG = "instructflow.gate.decision"
REASONS_TAG = "instructflow.gate.reasons"
# train/evaluate/base artifact digests a version was registered from (re-runs reuse it)
SOURCE_TAG = "instructflow.source_digests"
GATED_METRICS = ("perplexity", "perplexity_base", "rougeL", "rougeL_base", "win_rate")
# Libraries the model needs at load time (instructflow itself must be installed too).
RUNTIME_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers")


class RegistryError(RuntimeError):
    pass


# -- loading --------------------------------------------------------------------------------
def _ref_of(path: Path, stage: str) -> ArtifactRef:
    digest = ""
    if (path / MANIFEST).is_file():
        digest = json.loads((path / MANIFEST).read_text())["digest"]
    return ArtifactRef(stage=stage, path=str(path), digest=digest)


def load_finetuned_dirs(train_dir: Path, base_dir: Path):
    """(model, tokenizer, template) from a train artifact dir and a base-model artifact dir."""
    from tasks.train import load_finetuned

    train_ref, base_ref = _ref_of(train_dir, "train"), _ref_of(base_dir, "base_model")
    info = json.loads((train_dir / "train.json").read_text())
    model, tokenizer = load_finetuned(train_ref, base_ref)
    return model, tokenizer, info.get("template", "alpaca")


class InstructflowModel(mlflow.pyfunc.PythonModel):
    """Generates answers; columns `instruction` (+ optional `input`) -> `response`."""

    # The model is logged with an explicit signature: skip MLflow's type-hint validation
    # (and its warning about missing hints, printed on every import of this module).
    _skip_type_hint_validation = True

    def load_context(self, context):
        train_dir = Path(context.artifacts["train"])
        base_dir = Path(context.artifacts["base"])
        self.model, self.tokenizer, self.template = load_finetuned_dirs(train_dir, base_dir)

    def predict(self, context, model_input, params=None):
        params = params or {}
        return [
            generate(
                self.model,
                self.tokenizer,
                self.template,
                row.get("instruction", ""),
                row.get("input") or "",
                max_new_tokens=int(params.get("max_new_tokens", 64)),
                temperature=float(params.get("temperature", 0.0)),
            )
            for row in _rows(model_input)
        ]


def _rows(model_input) -> list[dict[str, Any]]:
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, str):
        return [{"instruction": model_input}]
    return [r if isinstance(r, dict) else {"instruction": str(r)} for r in model_input]


def load_for_inference(uri_or_path: str):
    """(model, tokenizer, template) from `models:/NAME@alias`, `runs:/...`, a train artifact
    dir or a PEFT adapter dir (local paths go through `generation.load_model`)."""
    if "://" not in uri_or_path and not uri_or_path.startswith(("models:/", "runs:/")):
        from instructflow.generation import load_model

        return load_model(uri_or_path)
    try:
        loaded = mlflow.pyfunc.load_model(uri_or_path)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RegistryError(f"{uri_or_path}: cannot load from MLflow ({first})") from None
    inner = loaded.unwrap_python_model()
    return inner.model, inner.tokenizer, inner.template


def generate(
    model,
    tokenizer,
    template: str,
    instruction: str,
    input_text: str = "",
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
) -> str:
    """One answer to one instruction, prompted exactly as in training."""
    from instructflow import generation, templates

    user = "\n\n".join(p for p in (instruction.strip(), input_text.strip()) if p)
    row = {
        "instruction": instruction,
        "input": input_text,
        "output": "",
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": ""}],
    }
    prompt = templates.generation_prompt(row, template, tokenizer)
    return generation.generate(
        model,
        tokenizer,
        [prompt],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop_strings=templates.stop_strings(template, tokenizer),
        add_special_tokens=templates.add_special_tokens(template),
    )[0]


# -- logging --------------------------------------------------------------------------------
def stage_model_files(train: ArtifactRef, base: ArtifactRef, card: str, dest: Path) -> dict:
    """Copy what the registry model needs into dest; returns the pyfunc `artifacts` mapping."""
    tdir, bdir = dest / "train", dest / "base"
    tdir.mkdir(parents=True)
    for name in ("adapter", "model", "tokenizer"):
        if train.file(name).is_dir():
            shutil.copytree(train.file(name), tdir / name)
    for name in ("train.json", MANIFEST):
        shutil.copyfile(train.file(name), tdir / name)
    bdir.mkdir()
    for name in ("model.json", MANIFEST):
        shutil.copyfile(base.file(name), bdir / name)
    info = json.loads(base.file("model.json").read_text())
    if info.get("weights"):  # builtin:tiny: the weights exist only in the workspace
        shutil.copytree(base.file(info["weights"]), bdir / info["weights"])
    (dest / "card").mkdir()
    (dest / "card" / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    return {"train": str(tdir), "base": str(bdir), "card": str(dest / "card")}


def model_code_file(dest: Path) -> Path:
    """Models-from-code: MLflow stores this source instead of a pickle of the class."""
    path = dest / "instructflow_model.py"
    path.write_text(MODEL_CODE, encoding="utf-8")
    return path


MODEL_CODE = """\
import mlflow
from instructflow.registry import InstructflowModel

mlflow.models.set_model(InstructflowModel())
"""


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "instruction"), ColSpec("string", "input", False)]),
        outputs=Schema([ColSpec("string", "response")]),
        params=ParamSchema(
            [ParamSpec("max_new_tokens", "long", 64), ParamSpec("temperature", "double", 0.0)]
        ),
    )


def pip_requirements(method: str) -> list[str]:
    from importlib.metadata import version

    pkgs = list(RUNTIME_PACKAGES) + (["bitsandbytes"] if method == "qlora" else [])
    return [f"{p}=={version(p)}" for p in pkgs]


# -- the gate -------------------------------------------------------------------------------
def gate(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    cfg,
    same_split: bool = True,
    judge: dict[str, Any] | None = None,
) -> tuple[bool, list[str]]:
    """Promote or not, and why. Metrics: perplexity, rougeL, win_rate(+_low/_high), *_base;
    `judge`: the evaluate report's judge section (usable?, status, pairwise opponent)."""
    reasons: list[str] = []
    ok = True
    if champion is None:
        reasons.append(
            "no champion yet: the first version becomes champion unless a usable judge "
            "rejects it (ROUGE-L and perplexity rules need a champion)"
        )
    passed, reason = _win_rate_rule(challenger, cfg, judge or {})
    ok &= passed
    reasons.append(reason)
    if champion is None:
        return ok, reasons
    new, old, how = _comparable(challenger, champion, "rougeL", same_split)
    if new is None or old is None:
        reasons.append("ROUGE-L: not measured on both, rule skipped")
    else:
        drop = old - new
        passed = drop <= cfg.max_rougeL_drop
        ok &= passed
        reasons.append(
            f"ROUGE-L{how} {new:.4f} vs champion {old:.4f}: drop {drop:+.4f} "
            f"{'<=' if passed else '>'} {cfg.max_rougeL_drop}"
        )
    new, old, how = _comparable(challenger, champion, "perplexity", same_split)
    if new is None or old is None or old <= 0:
        reasons.append("perplexity: not measured on both, rule skipped")
    else:
        rise = new / old - 1.0
        passed = rise <= cfg.max_perplexity_increase
        ok &= passed
        reasons.append(
            f"perplexity{how} {new:.4g} vs champion {old:.4g}: {rise:+.1%} "
            f"{'<=' if passed else '>'} +{cfg.max_perplexity_increase:.1%}"
        )
    return ok, reasons


def _win_rate_rule(metrics: dict[str, float], cfg, judge: dict[str, Any]) -> tuple[bool, str]:
    """The judge rule: the 95 % bootstrap interval's LOWER bound of the pairwise win rate must
    reach `register.min_win_rate` (not the point estimate), and only a usable judge counts."""
    win, low, high = (metrics.get(k) for k in ("win_rate", "win_rate_low", "win_rate_high"))
    if win is None or low is None:
        return True, "win rate: no pairwise judge result, rule skipped"
    if not judge.get("usable"):
        status = judge.get("status") or "judge not calibrated"
        return True, f"win rate {win:.3f}: {status}; rule skipped"
    opponent = judge.get("pairwise_opponent", "base")
    against = "the champion" if opponent == "champion" else "the base model"
    passed = low >= cfg.min_win_rate
    return passed, (
        f"win rate vs {against} {win:.3f}, 95 % interval [{low:.3f}, {high:.3f}]: lower bound "
        f"{'>=' if passed else '<'} {cfg.min_win_rate}"
    )


def _comparable(new: dict, old: dict, name: str, same_split: bool):
    """Raw values on the same test split; otherwise each one's gain over its base model."""
    if same_split:
        return new.get(name), old.get(name), ""
    nb, ob = new.get(f"{name}_base"), old.get(f"{name}_base")
    if None in (new.get(name), old.get(name), nb, ob):
        return None, None, ""
    if name == "perplexity":  # ratio to base, so a split change cancels out
        return new[name] / nb, old[name] / ob, " (relative to base, test splits differ)"
    return new[name] - nb, old[name] - ob, " (gain over base, test splits differ)"


def version_metrics(version) -> dict[str, float]:
    return {
        k[len(METRIC_TAG) :]: float(v) for k, v in version.tags.items() if k.startswith(METRIC_TAG)
    }
