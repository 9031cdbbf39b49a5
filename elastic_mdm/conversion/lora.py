"""The LoRA budget of a retrofit: trainable parameters of peft LoRA plus fully trained new modules, without memory."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..configuration_elastic_mdm import ElasticMDMConfig
from .plan import meta_model


def lora_parameter_count(
    config: ElasticMDMConfig, r: int, target_modules: Iterable[str], modules_to_save: Iterable[str] = ()
) -> dict[str, int]:
    """Trainable parameters of peft LoRA of rank `r` plus fully trained `modules_to_save`, counted on a meta-device
    model (no memory), with peft's matching rules.

    LoRA: every `nn.Linear` named `t` or ending with `.t` for a `t` in `target_modules` gets `A: r x in` and
    `B: out x r`, i.e. `r * (in + out)` parameters. `modules_to_save`: every module whose name ends with one of the
    strings (a plain suffix: `"adaln"` also matches `final_adaln`) is trained in full. Returns
    `{"lora", "modules_to_save", "trainable", "total"}` (`total`: the parameters of the model itself).
    """
    model = meta_model(config)
    targets, saved_names = tuple(target_modules), tuple(modules_to_save)
    lora = saved = 0
    saved_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in saved_prefixes):
            continue
        if name.endswith(saved_names):  # an empty tuple matches nothing
            saved += sum(p.numel() for p in module.parameters())
            saved_prefixes.append(name + ".")
        elif isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            lora += r * (module.in_features + module.out_features)
    total = sum(p.numel() for p in model.parameters())
    return {"lora": lora, "modules_to_save": saved, "trainable": lora + saved, "total": total}
