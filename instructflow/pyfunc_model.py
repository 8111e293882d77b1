"""The MLflow pyfunc model a registered version is: the adapter on its base, answering rows of
`instruction` (+ optional `input`) with `response`. Apart from instructflow.registry so that
importing the registry (the register stage does) does not import MLflow's model machinery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

from instructflow import loading
from instructflow.registry import generate


class InstructflowModel(mlflow.pyfunc.PythonModel):
    """Generates answers; columns `instruction` (+ optional `input`) -> `response`."""

    # The model is logged with an explicit signature: skip MLflow's type-hint validation
    # (and its warning about missing hints, printed on every import of this module).
    _skip_type_hint_validation = True

    def load_context(self, context):
        train_dir = Path(context.artifacts["train"])
        base_dir = Path(context.artifacts["base"])
        self.model, self.tokenizer, self.template = loading.load_artifact_dirs(train_dir, base_dir)

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
