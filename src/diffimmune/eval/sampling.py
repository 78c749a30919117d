"""Seeded, batched sampling with a PNG cache per (model state, prompt, seed, sampler settings).

The cache lives in the folder of the model state being sampled (an attack checkpoint never changes once
written), so re-running an evaluation reuses every image. A second, shared cache can be named by the
model's weights (`weights_fingerprint`): checkpoints whose weights are identical (every attack's step 0
on one model, for instance) then generate each image once, and each checkpoint folder still receives
its copy. Images are quantised to 8 bits before use, so a cached and a freshly generated image give
identical metrics.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffimmune.files import atomic_file


def sample_key(prompt: str, seed: int, steps: int, guidance_scale: float, sampler: str) -> str:
    return hashlib.sha1(f"{prompt}|{seed}|{steps}|{guidance_scale}|{sampler}".encode()).hexdigest()[:20]


def load_png(path: str | Path) -> torch.Tensor:
    """A cached generation as [3, H, W] in [0, 1]."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def weights_fingerprint(model) -> str:
    """A digest of everything that decides a generation besides the prompt, seed and sampler settings:
    every weight (denoiser, text encoder, autoencoder) with its name, shape and dtype, the tokenizer's
    added tokens and the scheduler's configuration."""
    digest = hashlib.blake2b(digest_size=16)
    named = dict(model.named_parameters())
    if getattr(model, "vae", None) is not None:
        named.update({f"vae.{n}": p for n, p in model.vae.named_parameters()})
    for name, tensor in sorted(named.items()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    added = getattr(model.tokenizer, "get_added_vocab", dict)()
    digest.update(json.dumps(sorted(added.items())).encode())
    digest.update(json.dumps(dict(model.scheduler.config), sort_keys=True, default=str).encode())
    return digest.hexdigest()


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
    shared_dir: str | Path | None = None,
) -> torch.Tensor:
    """Images [N,3,H,W] in [0,1] for prompts[i] with seeds[i]; missing ones are generated in batches.

    `shared_dir` (a folder named by `weights_fingerprint(model)`) is looked up after `cache_dir`; a hit
    there is copied into `cache_dir`, and fresh images are written to both."""
    keys = [sample_key(p, s, steps, guidance_scale, sampler) for p, s in zip(prompts, seeds, strict=True)]
    cache = Path(cache_dir) if cache_dir is not None else None
    shared = Path(shared_dir) if shared_dir is not None else None
    images: list[torch.Tensor | None] = [None] * len(prompts)
    for index, key in enumerate(keys):
        for folder in (cache, shared):
            path = folder / f"{key}.png" if folder is not None else None
            if path is None or not path.is_file():
                continue
            images[index] = load_png(path)
            if folder is shared and cache is not None:
                with atomic_file(cache / path.name) as temporary:
                    shutil.copyfile(path, temporary)
            break
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
            pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            for folder in (cache, shared):
                if folder is not None:
                    with atomic_file(folder / f"{keys[index]}.png") as temporary:
                        Image.fromarray(pixels).save(temporary, format="PNG")
    return torch.stack(images) if images else torch.empty(0)
