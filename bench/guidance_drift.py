"""How far each defence of a pipeline run moves the denoiser's predictions on the data it should keep, split
into the conditional and the unconditional (empty-prompt) halves of classifier-free guidance.

Sampling uses uncond + s (cond - uncond) (the evaluation's s = 4), so a drift of the unconditional
prediction is amplified (s - 1) times. A defence that trains the whole denoiser and keeps only the
conditional predictions (the retain loss without `retain_unconditional`) can look harmless on the
conditional half and still wreck generation. For every immunized model of the run: the mean squared
distance to the erased (or base) model's predictions on the same noisy images of the other known shapes,
for the prompt (cond), the empty prompt (uncond) and the guided combination.

    python bench/guidance_drift.py runs/relearning-2-lr1e-3 [--models imma_unet_d20,imma_unet_d20_u]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from relearning_table import defence_deltas, model_name

from diffimmune.core.objective import Batch, sample_noise_and_timesteps
from diffimmune.data.sources import load_concept_data, model_world
from diffimmune.eval.evaluate import EvalSettings
from diffimmune.models.diffusion_model import load_model


def predictions(model, x_t, timesteps, prompts, scale):
    """The conditional, unconditional (empty-prompt) and guided noise predictions."""
    with torch.no_grad():
        cond = model.denoise(None, x_t, timesteps, model.encode_prompts(prompts))
        uncond = model.denoise(None, x_t, timesteps, model.encode_prompts([""] * len(prompts)))
    return cond, uncond, uncond + scale * (cond - uncond)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--models", default=None, help="comma-separated defence names (default: all)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)

    experiment = json.loads((args.run / "experiment.json").read_text())
    targets = [t.partition("=")[2] or t for t in experiment["targets"]]
    erased = sorted((args.run / "erase").glob("*-*"))
    reference_dir = erased[0] if erased else None
    reference = load_model(reference_dir) if reference_dir else None
    defences = defence_deltas(args.run, args.models)
    if reference is None:
        reference = load_model(json.loads((defences[0].parent / "immunize.json").read_text())["model"])
    world = model_world(reference)
    others = [s for s in world.known_shapes if s not in targets]
    data = load_concept_data(f"world:shape={','.join(others)}", args.images, seed=args.seed, world=world)
    x0 = reference.encode_images(data.images)
    generator = torch.Generator().manual_seed(args.seed)
    noise, timesteps = sample_noise_and_timesteps(reference, Batch(x0, data.captions), generator)
    x_t = reference.scheduler.add_noise(x0, noise, timesteps)
    scale = EvalSettings().guidance_scale
    expected = predictions(reference, x_t, timesteps, data.captions, scale)

    print(f"other shapes ({', '.join(others)}), {len(x0)} noisy images; guidance scale {scale}")
    print("| model | cond | uncond | guided |")
    print("|---|---|---|---|")
    for delta in defences:
        found = predictions(load_model(delta), x_t, timesteps, data.captions, scale)
        distances = [(a - b).pow(2).mean().item() for a, b in zip(found, expected, strict=True)]
        print(f"| {model_name(str(delta))} | " + " | ".join(f"{d:.4f}" for d in distances) + " |")


if __name__ == "__main__":
    main()
