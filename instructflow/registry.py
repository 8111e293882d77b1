"""The fine-tuned model in the MLflow registry: a pyfunc around the adapter, and the tags
that record the gate's decision (the rules are instructflow.gate).

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

`model_specs.load_for_inference(uri_or_path)` is the one loader for generate/serve:
`models:/NAME@alias`, `runs:/...`, a train artifact dir, or an adapter dir.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from instructflow.artifacts import MANIFEST, ArtifactRef

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG = "instructflow.metric."
SPLIT_TAG = "instructflow.test_split_digest"
DECISION_TAG = "instructflow.gate.decision"
REASONS_TAG = "instructflow.gate.reasons"
# train/evaluate/base artifact digests a version was registered from (re-runs reuse it)
SOURCE_TAG = "instructflow.source_digests"
# Libraries the model needs at load time (instructflow itself must be installed too).
RUNTIME_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers")


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
from instructflow.pyfunc_model import InstructflowModel

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

    from instructflow.training import methods

    pkgs = list(RUNTIME_PACKAGES) + list(methods.get(method).runtime_packages)
    return [f"{p}=={version(p)}" for p in pkgs]


def version_metrics(version) -> dict[str, float]:
    return {
        k[len(METRIC_TAG) :]: float(v) for k, v in version.tags.items() if k.startswith(METRIC_TAG)
    }


def resolve_version(uri: str) -> str:
    """`models:/NAME@alias` or `models:/NAME/VERSION` -> "NAME/VERSION (run RUN_ID)": what the
    URI loads now (cache keys of stages that load it). Unresolvable: the URI itself."""
    from mlflow.tracking import MlflowClient

    rest = uri.removeprefix("models:/")
    client = MlflowClient()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = rest.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except Exception:
        return uri
    return f"{version.name}/{version.version} (run {version.run_id})"
