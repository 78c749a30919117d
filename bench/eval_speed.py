"""Benchmark: sampling throughput (images/s) and the cost of a full evaluation of one attack run, on
the world model (default: the built default world), side by side in one run.

    python bench/eval_speed.py [--model DIR] [--images 64] [--steps 25]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from diffimmune.attacks.runner import run_attack
from diffimmune.config import AttackConfig
from diffimmune.data.sources import model_world
from diffimmune.eval.evaluate import EvalSettings, evaluate_run
from diffimmune.models.diffusion_model import DiffusionModel, quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="world model folder (default: diffimmune world build)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    quiet_libraries()
    if args.model is None:
        from diffimmune.recipes.world_build import build_world

        args.model = str(build_world("default", log=lambda m: None).model_dir)
    model = DiffusionModel.from_pretrained(args.model, device="cpu")
    prompts = ["a red star in stripes style"] * args.images
    model.generate(prompts[:4], seeds=list(range(4)), steps=2)  # warm-up
    started = time.perf_counter()
    model.generate(prompts, seeds=list(range(args.images)), steps=args.steps, guidance_scale=4.0)
    sampling = time.perf_counter() - started
    print(f"device: {model.device}, torch threads: {torch.get_num_threads()}")
    print(
        f"sampling: {args.images} images, {args.steps} DDIM steps, CFG: {sampling:.2f} s -> {args.images / sampling:.1f} images/s"
    )

    folder = Path(tempfile.mkdtemp(prefix="eval-speed-"))
    try:
        config = AttackConfig(
            method="lora",
            learning_rate=1e-3,
            steps=100,
            data="world:shape=heart",
            prompt="a {colour} {token} in {style} style",
            save_at=[0, 50, 100],
        )
        started = time.perf_counter()
        run_attack(model, config, folder / "attack", progress=False, world=model_world(model))
        attack = time.perf_counter() - started
        settings = EvalSettings(samples=16, steps=args.steps)
        started = time.perf_counter()
        evaluate_run(folder, settings)
        first = time.perf_counter() - started
        started = time.perf_counter()
        evaluate_run(folder, settings)
        cached = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    concepts = 1 + len(model_world(model).known_shapes)
    generated = 3 * concepts * settings.samples
    print(f"attack: LoRA, 100 steps, 3 saved steps: {attack:.1f} s")
    print(
        f"full evaluation of that run (3 steps x {concepts} concepts x {settings.samples} samples = {generated} images, "
        f"detection, similarity, best-of-25, FID/KID): {first:.1f} s; again from the sample cache: {cached:.1f} s"
    )


if __name__ == "__main__":
    main()
