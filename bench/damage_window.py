"""Where along the sampler a defence breaks the shapes it should keep: hybrid sampling.

For each kept (non-target) shape, the evaluation's prompts and seeds are sampled with the evaluation's
guided 25-step DDIM, but the denoiser is switched per step between the erased (or base) model and a
defence: the defence only in a window of steps (high noise first), from a step on, or only for one half
of the guidance (its conditional prediction with the erased model's unconditional one, and the reverse). The
kept shapes' detection rate of each hybrid says which steps, and which half, lose them: a window whose
hybrid keeps the erased model's rate is one the defence does not damage.

    python bench/damage_window.py runs/relearning-3-lr1e-3 --models mima_unet_lora_adapted_adam_d10_u
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from relearning_table import defence_deltas, kept_shapes, model_name

from diffimmune.eval.evaluate import EVAL_SEED, concept_prompts
from diffimmune.models.diffusion_model import load_model


def hybrid_sample(reference, defence, prompts, seeds, steps, scale, choose):
    """Guided DDIM from the seeds' noise; `choose(i)` -> (cond model, uncond model) at step i."""
    scheduler = reference.make_sampler("ddim")
    scheduler.set_timesteps(steps)
    models = {"reference": reference, "defence": defence}
    conditions = {k: m.encode_prompts(prompts) for k, m in models.items()}
    empties = {k: m.encode_prompts([""] * len(prompts)) for k, m in models.items()}
    latents = reference.initial_noise(seeds) * scheduler.init_noise_sigma
    with torch.no_grad():
        for index, t in enumerate(scheduler.timesteps):
            cond_key, uncond_key = choose(index)
            x = scheduler.scale_model_input(latents, t)
            cond = models[cond_key].denoise(None, x, t, conditions[cond_key])
            uncond = models[uncond_key].denoise(None, x, t, empties[uncond_key])
            latents = scheduler.step(uncond + scale * (cond - uncond), t, latents, return_dict=False)[0]
        return reference.decode(latents).float().cpu()


def hybrids(steps: int, windows: int):
    """(label, choose) pairs: every step one model, each window of steps the defence, each half."""
    yield "erased everywhere", lambda i: ("reference", "reference")
    yield "defence everywhere", lambda i: ("defence", "defence")
    bounds = [round(k * steps / windows) for k in range(windows + 1)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        yield (
            f"defence at steps {lo}-{hi - 1}",
            (lambda i, lo=lo, hi=hi: ("defence",) * 2 if lo <= i < hi else ("reference",) * 2),
        )
        yield (
            f"defence from step {lo}",
            (lambda i, lo=lo: ("defence",) * 2 if i >= lo else ("reference",) * 2),
        )
    yield "defence's cond, erased uncond", lambda i: ("defence", "reference")
    yield "erased cond, defence's uncond", lambda i: ("reference", "defence")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--models", required=True, help="comma-separated defence names")
    parser.add_argument("--windows", type=int, default=5, help="windows of sampler steps")
    args = parser.parse_args()
    torch.set_num_threads(2)

    kept = kept_shapes(args.run)
    settings, world, classifier = kept.settings, kept.world, kept.classifier
    reference = load_model(sorted((args.run / "erase").glob("*-*"))[0])
    plans = []
    for shape in kept.others:
        prompts, _ = concept_prompts(world, "shape", shape, None, "sks", settings.samples)
        plans.append((shape, prompts, [EVAL_SEED * 1000 + i for i in range(len(prompts))]))
    for delta in defence_deltas(args.run, args.models):
        defence = load_model(delta)
        print(f"\n{model_name(str(delta))}: kept shapes detected (guidance {settings.guidance_scale})")
        print("| sampler | " + " | ".join(kept.others) + " | mean |")
        print("|---|" + "---|" * (len(kept.others) + 1))
        for label, choose in hybrids(settings.steps, args.windows):
            rates = []
            for shape, prompts, seeds in plans:
                images = hybrid_sample(
                    reference, defence, prompts, seeds, settings.steps, settings.guidance_scale, choose
                )
                rates.append(sum(p == shape for p in classifier.predict(images)["shape"]) / len(prompts))
            cells = " | ".join(f"{r:.0%}" for r in rates)
            print(f"| {label} | {cells} | {sum(rates) / len(rates):.0%} |", flush=True)


if __name__ == "__main__":
    main()
