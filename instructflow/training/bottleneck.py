"""Bottleneck adapters (Houlsby et al. 2019): after a block's output, x + up(f(down(x))).

Why our own: PEFT has no bottleneck adapter type, and AdapterHub's `adapters` 1.3 pins
transformers 4.57 (this project runs 5.x). The module is small and the saved layout is plain:

    adapter/adapter_config.json        {"adapter_type": "bottleneck", "format": FORMAT,
                                        "base_model_name_or_path", "reduction_factor",
                                        "non_linearity", "target_modules", "hidden_size",
                                        "bottleneck_size"}
    adapter/adapter_model.safetensors  "<block path>.bottleneck_adapter.{down,up}.{weight,bias}"
                                       e.g. "model.layers.0.mlp.bottleneck_adapter.down.weight"

`load(base, folder)` attaches the adapters to any base with the same block names; forward
hooks add them, so the base's own code and weights stay untouched. `up` starts at zero: the
model is exactly the base until training moves it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "instructflow-bottleneck-v1"
ADAPTER_TYPE = "bottleneck"
CHILD = "bottleneck_adapter"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden: int, width: int, non_linearity: str):
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def _hook(module: nn.Module, _args: Any, output: Any) -> Any:
    adapter = getattr(module, CHILD)
    if isinstance(output, tuple):  # attention blocks return (hidden, weights, ...)
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def is_bottleneck(folder: Path) -> bool:
    try:
        cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("adapter_type") == ADAPTER_TYPE


def _settings(method_cfg: Any, hidden: int) -> dict[str, Any]:
    return {
        "adapter_type": ADAPTER_TYPE,
        "format": FORMAT,
        "reduction_factor": method_cfg.reduction_factor,
        "non_linearity": method_cfg.non_linearity,
        "target_modules": list(method_cfg.target_modules),
        "hidden_size": hidden,
        "bottleneck_size": max(1, hidden // method_cfg.reduction_factor),
    }


def _add(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    targets = set(settings["target_modules"])
    blocks = [
        (name, m)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and ".layers." in f".{name}"
    ]
    if not blocks:
        raise ValueError(
            f"adapter: no block named {sorted(targets)} inside the model's layers "
            "(set train.method.target_modules to its attention / feed-forward block names)"
        )
    dtype = next(model.parameters()).dtype
    for _, block in blocks:
        adapter = BottleneckAdapter(
            settings["hidden_size"], settings["bottleneck_size"], settings["non_linearity"]
        )
        block.add_module(CHILD, adapter.to(dtype=dtype, device=next(block.parameters()).device))
        block.register_forward_hook(_hook)
    model.bottleneck_settings = settings
    return model


def attach(model: nn.Module, method_cfg: Any) -> nn.Module:
    """Freeze the base and add trainable adapters (the train stage's entry)."""
    for p in model.parameters():
        p.requires_grad_(False)
    _add(model, _settings(method_cfg, model.config.hidden_size))
    # Gradients must reach the adapters of early layers through frozen embeddings.
    model.enable_input_require_grads()
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if f".{CHILD}." in k}


def save(model: nn.Module, folder: Path, base_model_name_or_path: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(folder / "adapter_model.safetensors"))
    settings = {**model.bottleneck_settings, "base_model_name_or_path": base_model_name_or_path}
    (folder / "adapter_config.json").write_text(json.dumps(settings, indent=1))


def load(base: nn.Module, folder: Path) -> nn.Module:
    """`base` with the saved adapters of `folder` attached (weights from safetensors)."""
    from safetensors.torch import load_file

    settings = json.loads((Path(folder) / "adapter_config.json").read_text())
    if settings.get("format") != FORMAT:
        raise ValueError(f"{folder}: unknown bottleneck adapter format {settings.get('format')!r}")
    _add(base, settings)
    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    _, unexpected = base.load_state_dict(state, strict=False)
    expected = set(adapter_state(base))
    if unexpected or expected - set(state):
        raise ValueError(f"{folder}: adapter weights do not fit this base model")
    return base
