"""LoRA state <-> the diffusers LoRA format, so `pipeline.load_lora_weights(dir)` (peft underneath)
loads what diffimmune trained, and any LoRA tool can pick it up."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from diffimmune.adapters.base import LoRAAdapter
from diffimmune.files import atomic_folder

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def module_path(parameter_name: str) -> str:
    """`unet.down_blocks.1...attn1.to_q.weight` -> `down_blocks.1...attn1.to_q`."""
    return parameter_name.removeprefix("unet.").removesuffix(".weight")


def peft_state_dict(adapter: LoRAAdapter, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """peft's key layout, with the alpha / rank scale folded into B so loading at scale 1 is exact."""
    layers = {}
    for key, value in state.items():
        name, part = key.rsplit(".", 1)
        if not name.startswith("unet."):
            continue
        scaled = value * adapter.scale if part == "lora_B" else value
        layers[f"{module_path(name)}.{part}.weight"] = scaled.detach().cpu().contiguous()
    return layers


def export_diffusers_lora(adapter: LoRAAdapter, state: dict[str, Tensor], directory: str | Path) -> Path:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    layers = peft_state_dict(adapter, state)
    targets = sorted({key.rsplit(".lora_", 1)[0] for key in layers})
    rank = adapter.config.rank
    metadata = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False).to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    target = Path(directory)
    with atomic_folder(target) as temporary:
        StableDiffusionPipeline.save_lora_weights(
            temporary, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata
        )
    return target
