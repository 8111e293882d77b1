"""Training methods as data: what each one needs and builds, in one table.

Adding a method = its config class in instructflow.config (a member of `TrainMethod`), one
`Method` entry here, and a test. The trainer, the evaluate stage's adapter folding, `merge`,
generation (virtual tokens) and the registry read these entries; none of them branches on a
method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from instructflow.config import (
    AdapterMethod,
    DoraMethod,
    FullMethod,
    IA3Method,
    LoraMethod,
    PrefixTuningMethod,
    PromptTuningMethod,
    QLoraMethod,
)


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    # The PEFT config for (method config, tokenizer dir); None: not a PEFT method.
    peft_config: Callable[[Any, str], Any] | None
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
    # Non-PEFT adapters: (base model, method config) -> the model to train, adapters attached.
    attach: Callable[[Any, Any], Any] | None = None

    @property
    def saves_adapter(self) -> bool:
        """Trains and saves a small adapter on a frozen base (else: the whole model)."""
        return self.peft_config is not None or self.attach is not None


def learning_rate(method_cfg: Any, default: float) -> float:
    """The method's own rate where it has one (soft prompts, IA3), else train.learning_rate."""
    return getattr(method_cfg, "learning_rate", None) or default


def _lora(cfg: LoraMethod, _tokenizer: str, dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=dora,
        task_type="CAUSAL_LM",
    )


def _prompt_tuning(cfg: PromptTuningMethod, tokenizer: str):
    from peft import PromptTuningConfig

    text = {"prompt_tuning_init_text": cfg.init_text, "tokenizer_name_or_path": tokenizer}
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=cfg.init.upper(),
        **(text if cfg.init == "text" else {}),
    )


def _prefix_tuning(cfg: PrefixTuningMethod, _tokenizer: str):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size,
    )


def _ia3(cfg: IA3Method, _tokenizer: str):
    from peft import IA3Config

    return IA3Config(
        task_type="CAUSAL_LM",
        target_modules=cfg.target_modules,
        feedforward_modules=cfg.feedforward_modules,
    )


def _bottleneck(model, cfg: AdapterMethod):
    from instructflow.training import bottleneck

    return bottleneck.attach(model, cfg)


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
        Method(
            "dora",
            DoraMethod,
            lambda c, t: _lora(c, t, dora=True),
            mergeable=True,
            peft_type="LORA",
        ),
        Method("full", FullMethod, None),
        Method(
            "prompt_tuning",
            PromptTuningMethod,
            _prompt_tuning,
            packing=False,
            peft_type="PROMPT_TUNING",
        ),
        Method(
            "prefix_tuning",
            PrefixTuningMethod,
            _prefix_tuning,
            packing=False,
            peft_type="PREFIX_TUNING",
        ),
        Method("ia3", IA3Method, _ia3, mergeable=True, peft_type="IA3"),
        # Bottleneck adapters are not a PEFT type, and AdapterHub's `adapters` (1.3) needs
        # transformers 4.57: instructflow.training.bottleneck is a small module of our own.
        Method("adapter", AdapterMethod, None, attach=_bottleneck),
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
