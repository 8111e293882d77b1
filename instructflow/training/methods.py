"""Training methods as data: what each one needs and builds, in one table.

Adding a method = its config class in instructflow.config (a member of `TrainMethod`), one
`Method` entry here, and a test. The trainer, the evaluate stage's adapter folding, `merge`
and the registry read these entries; none of them branches on a method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from instructflow.config import DoraMethod, FullMethod, LoraMethod, QLoraMethod


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    # The PEFT config for a method config (None: every weight is trained).
    peft_config: Callable[[Any], Any] | None
    # The frozen base is loaded in 4 bits (bitsandbytes nf4) and prepared for k-bit training.
    quantize_4bit: bool = False
    # The adapter can be merged into the base weights (`train.merge`, folding for generation).
    mergeable: bool = False
    # Padding-free packing is exact for it (no virtual tokens that examples would share).
    packing: bool = True
    # PEFT's name for the adapter type, to find the method of a saved adapter.
    peft_type: str | None = None
    # Extra packages needed to load the trained model (the registry's pip requirements).
    runtime_packages: tuple[str, ...] = ()


def _lora(cfg: LoraMethod, dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=dora,
        task_type="CAUSAL_LM",
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", LoraMethod, _lora, mergeable=True, peft_type="LORA"),
        Method(
            "qlora",
            QLoraMethod,
            _lora,
            quantize_4bit=True,
            mergeable=True,
            peft_type="LORA",
            runtime_packages=("bitsandbytes",),
        ),
        Method("dora", DoraMethod, lambda c: _lora(c, dora=True), mergeable=True, peft_type="LORA"),
        Method("full", FullMethod, None),
    )
}


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown training method {name!r}; known: {', '.join(METHODS)}") from None


def of_adapter(model) -> Method | None:
    """The method of a loaded PeftModel's active adapter (None for a plain model)."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    peft_type = getattr(config.peft_type, "value", str(config.peft_type))
    return next((m for m in METHODS.values() if m.peft_type == peft_type), None)
