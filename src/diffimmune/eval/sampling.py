"""Seeded, batched sampling with a PNG cache per (model state, prompt, seed, sampler settings).

The cache lives in the folder of the model state being sampled (an attack checkpoint never changes once
written), so re-running an evaluation reuses every image. Images are quantised to 8 bits before use,
so a cached and a freshly generated image give identical metrics.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffimmune.files import atomic_file


def sample_key(prompt: str, seed: int, steps: int, guidance_scale: float, sampler: str) -> str:
    return hashlib.sha1(f"{prompt}|{seed}|{steps}|{guidance_scale}|{sampler}".encode()).hexdigest()[:20]


def quantise(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round() / 255


def generate_cached(
    model,
    prompts: list[str],
    seeds: list[int],
    cache_dir: str | Path | None,
    steps: int = 25,
    guidance_scale: float = 4.0,
    sampler: str = "ddim",
    batch_size: int = 64,
) -> torch.Tensor:
    """Images [N,3,H,W] in [0,1] for prompts[i] with seeds[i]; missing ones are generated in batches."""
    keys = [sample_key(p, s, steps, guidance_scale, sampler) for p, s in zip(prompts, seeds, strict=True)]
    cache = Path(cache_dir) if cache_dir is not None else None
    images: list[torch.Tensor | None] = [None] * len(prompts)
    if cache is not None:
        for index, key in enumerate(keys):
            path = cache / f"{key}.png"
            if path.is_file():
                images[index] = (
                    torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
                )
    missing = [i for i, image in enumerate(images) if image is None]
    if missing:
        fresh = quantise(
            model.generate(
                [prompts[i] for i in missing],
                seeds=[seeds[i] for i in missing],
                steps=steps,
                guidance_scale=guidance_scale,
                sampler=sampler,
                batch_size=batch_size,
            )
        )
        for index, image in zip(missing, fresh, strict=True):
            images[index] = image
            if cache is not None:
                pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                with atomic_file(cache / f"{keys[index]}.png") as temporary:
                    Image.fromarray(pixels).save(temporary, format="PNG")
    return torch.stack(images) if images else torch.empty(0)
