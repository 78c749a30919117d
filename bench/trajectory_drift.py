"""Where a defence's predictions drift, per kept shape: on noised real images (what every retain loss
measures and minimises) against on the states the erased model's own sampler visits.

For each kept shape, the evaluation's first prompts and seeds: the erased (or base) model's 25-step DDIM
trajectory with classifier-free guidance (the evaluation's settings) is recorded; each defence's guided
prediction at every recorded state is compared with the erased model's (mean squared distance). The
same is measured on the shape's real images noised at random timesteps. Each column is printed as a
multiple of the row's mean over shapes, so the two measures can be compared: a shape that stands out
on the trajectory and not on noised images is one the retain loss cannot see.

    python bench/trajectory_drift.py runs/immunization-ii-unet --models gift_unet_b1_r20_m1_u
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from guidance_drift import predictions
from relearning_table import defence_deltas, model_name, run_experiment

from diffimmune.core.objective import Batch, sample_noise_and_timesteps
from diffimmune.data.sources import model_world
from diffimmune.eval.evaluate import EVAL_SEED, concept_prompts
from diffimmune.models.diffusion_model import load_model


def guided(model, latents, t, prompts, scale):
    """The guided prediction (guidance_drift's helper, which also returns the two halves)."""
    return predictions(model, latents, t, prompts, scale)[2]


def trajectory_states(model, prompts, seeds, steps, scale):
    """The (latents, timestep) pairs the model's guided DDIM sampler visits from the seeds' noise."""
    states = []
    with torch.no_grad():
        model.sample(
            prompts, model.initial_noise(seeds), steps, scale, on_state=lambda x, t: states.append((x, t))
        )
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--models", required=True, help="comma-separated defence names")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per kept shape")
    args = parser.parse_args()
    torch.set_num_threads(2)

    targets, settings = run_experiment(args.run)
    reference = load_model(sorted((args.run / "erase").glob("*-*"))[0])
    world = model_world(reference)
    others = [s for s in world.known_shapes if s not in targets]
    defences = {model_name(str(d)): d for d in defence_deltas(args.run, args.models)}
    scale = settings.guidance_scale
    probes = {}
    for index, shape in enumerate(others):
        prompts, data = concept_prompts(world, "shape", shape, None, "sks", settings.samples)
        prompts, images = prompts[: args.prompts], data.images[: args.prompts]
        seeds = [EVAL_SEED * 1000 + i for i in range(len(prompts))]
        states = trajectory_states(reference, prompts, seeds, settings.steps, scale)
        x0 = reference.encode_images(images)
        noise, timesteps = sample_noise_and_timesteps(
            reference, Batch(x0, prompts), torch.Generator().manual_seed(index)
        )
        noised = reference.scheduler.add_noise(x0, noise, timesteps)
        probes[shape] = (
            prompts,
            [(s, t, guided(reference, s, t, prompts, scale)) for s, t in states],
            (noised, timesteps, guided(reference, noised, timesteps, prompts, scale)),
        )
    print(f"guided drift (scale {scale}) per kept shape, as a multiple of the row's mean over shapes")
    print("| model | measure | " + " | ".join(others) + " | mean |")
    print("|---|---|" + "---|" * (len(others) + 1))
    for name, delta in defences.items():
        model = load_model(delta)
        on_trajectory, on_noised = [], []
        for shape in others:
            prompts, states, (noised, timesteps, expected) = probes[shape]
            distances = [(guided(model, s, t, prompts, scale) - e).pow(2).mean().item() for s, t, e in states]
            on_trajectory.append(sum(distances) / len(distances))
            on_noised.append(
                (guided(model, noised, timesteps, prompts, scale) - expected).pow(2).mean().item()
            )
        for label, values in (("sampler's states", on_trajectory), ("noised real images", on_noised)):
            mean = sum(values) / len(values)
            cells = " | ".join(f"{v / mean:.2f}" for v in values)
            print(f"| {name} | {label} | {cells} | {mean:.4f} |")


if __name__ == "__main__":
    main()
