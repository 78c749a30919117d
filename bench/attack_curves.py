"""Every attack of the suite teaching a held-out shape to the world model: the detector's rate for
that shape at each saved step, a metrics.csv and a report.

    python bench/attack_curves.py [--model DIR] [--concept heart] [--steps 400] [--out docs/attacks]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from diffimmune.attacks.presets import WORLD_ATTACK_METHODS, world_attack
from diffimmune.attacks.runner import run_attack
from diffimmune.data.sources import model_world
from diffimmune.eval.evaluate import EvalSettings, evaluate_run, read_metrics_csv
from diffimmune.models.diffusion_model import DiffusionModel, quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="world model folder (default: diffimmune world build)")
    parser.add_argument("--concept", default="heart")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--methods", default=",".join(WORLD_ATTACK_METHODS))
    parser.add_argument("--out", default="runs/attack-curves")
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="override the presets' learning rate"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override an attack setting (YAML value), e.g. --set batch_size=8; repeatable",
    )
    parser.add_argument("--other-concepts", type=int, default=3, help="other shapes checked for retention")
    args = parser.parse_args()
    quiet_libraries()
    if args.model is None:
        from diffimmune.recipes.world_build import build_world

        args.model = str(build_world("default", log=print).model_dir)
    model = DiffusionModel.from_pretrained(args.model, device="cpu")
    world = model_world(model)
    out = Path(args.out)
    for method in args.methods.split(","):
        started = time.perf_counter()
        overrides = {"learning_rate": args.learning_rate} if args.learning_rate else {}
        for item in args.set:
            field, _, value = item.partition("=")
            overrides[field] = yaml.safe_load(value)
        config = world_attack(method, args.concept, args.steps, **overrides)
        run_attack(model, config, out / method, resume=False, progress=False, world=world)
        print(f"{method}: {time.perf_counter() - started:.0f} s")
    settings = EvalSettings(
        samples=args.samples, other_concepts=args.other_concepts, fid=args.other_concepts > 0
    )
    rows = read_metrics_csv(evaluate_run(out, settings, targets=[f"shape={args.concept}"], log=print))
    steps = sorted({r["step"] for r in rows})
    print(f"\ndetector rate for shape={args.concept} ({args.samples} samples per step)\n")
    print("| attack | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for method in args.methods.split(","):
        rates = {
            r["step"]: r["value"]
            for r in rows
            if r["attack"] == method
            and r["metric"] == "detection"
            and r["concept"] == f"shape={args.concept}"
        }
        print(f"| {method} | " + " | ".join(f"{rates[s]:.0%}" if s in rates else "" for s in steps) + " |")


if __name__ == "__main__":
    main()
