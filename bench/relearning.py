"""Re-learning on the world model (MIMA's first experiment, scaled to the world).

For each target set (2 and 3 known shapes): erase the shapes with UCE, immunize the erased model with
MIMA (and, for the first set, Joint, Compose and MIMA with first-order hypergradients), attack every model
with LoRA on each target's own captioned images, and measure the detector's rate for the targets at every
saved attack step, the other shapes' rate before/after immunization, and MSGR with the world encoder.

    python bench/relearning.py                      # writes docs/relearning/ (report.md + curves.png)
    python bench/relearning.py --quick              # fewer steps and samples (a smoke run)

Every stage is cached under --work (re-running skips finished stages).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TARGET_SETS = {2: ["star", "square"], 3: ["star", "square", "triangle"]}


def detection(model, classifier, world, shape, samples, steps, seed=4321):
    from diffimmune.recipes.world_build import quality_prompts

    prompts, _ = quality_prompts(world, shape, samples, seed)
    images = model.generate(
        prompts, seeds=[seed + i for i in range(samples)], steps=steps, guidance_scale=4.0
    )
    predicted = classifier.predict(images)["shape"]
    return float(np.mean([p == shape for p in predicted])), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "relearning")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "relearning")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sets", default="2,3")
    parser.add_argument("--immunize-steps", type=int, default=200)
    parser.add_argument("--attack-steps", type=int, default=400)
    parser.add_argument("--attack-lr", type=float, default=3e-3)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--retain-weight", type=float, default=1.0)
    parser.add_argument("--max-loss", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.immunize_steps, args.attack_steps, args.samples = 20, 50, 8

    from diffimmune.attacks.runner import attack_checkpoints, run_attack
    from diffimmune.config import AttackConfig
    from diffimmune.data.sources import load_concept_data, model_world
    from diffimmune.eval.classifier import WorldClassifier
    from diffimmune.eval.encoders import WorldEncoder
    from diffimmune.eval.metrics import cosine_similarity_to_references, msgr
    from diffimmune.methods.common import ImmunizeConfig, immunize
    from diffimmune.methods.uce import uce_erase
    from diffimmune.models.diffusion_model import DiffusionModel, load_model
    from diffimmune.recipes.world_build import build_world

    began = time.perf_counter()
    build = build_world("default", progress=False, log=lambda m: None)
    base = load_model(build.model_dir)
    world = model_world(base)
    classifier = WorldClassifier.load(build.classifier_dir)
    encoder = WorldEncoder(classifier)
    sample_steps = 25
    save_at = sorted({0, *(s for s in (50, 100, 200, 400) if s <= args.attack_steps), args.attack_steps})
    results: dict = {"settings": vars(args) | {"work": str(args.work), "out": str(args.out)}, "sets": {}}

    for size in [int(s) for s in args.sets.split(",")]:
        targets = TARGET_SETS[size]
        others = [s for s in world.known_shapes if s not in targets]
        folder = args.work / f"set{size}"
        erased_dir = folder / "erased"
        if not (erased_dir / "manifest.json").is_file():
            model = load_model(build.model_dir)
            edited = uce_erase(model, targets, "", others)
            reference = model.snapshot(edited)
            model.load_parameters(edited)
            model.save_delta(erased_dir, reference, method="uce", selection="xattn_kv")
        defences = {"mima": {"method": "mima"}}
        if args.baselines and size == min(int(s) for s in args.sets.split(",")):
            defences |= {
                "mima_first_order": {"method": "mima", "hypergradient": "first_order"},
                "joint": {"method": "joint"},
                "compose": {"method": "compose"},
            }
        models = {"erased": str(erased_dir)}
        timings = {}
        for name, settings in defences.items():
            run_dir = folder / name
            if not (run_dir / "delta" / "manifest.json").is_file():
                model = load_model(erased_dir)
                config = ImmunizeConfig(
                    concepts=[f"world:shape={t}" for t in targets],
                    steps=args.immunize_steps,
                    checkpoint_every=50,
                    retain_weight=args.retain_weight,
                    max_loss=args.max_loss,
                    **settings,
                )
                start = time.perf_counter()
                immunize(model, config, run_dir, resume=True, progress=False, world=world)
                timings[name] = time.perf_counter() - start
            models[name] = str(run_dir / "delta")
        rows: dict = {}
        for model_name, path in models.items():
            model = load_model(path)
            retention = {
                s: detection(model, classifier, world, s, args.samples, sample_steps)[0] for s in others
            }
            rows[model_name] = {"other_shapes": retention, "targets": {}}
            for target in targets:
                attack_dir = folder / "attacks" / f"{model_name}-{target}"
                config = AttackConfig(
                    method="lora",
                    learning_rate=args.attack_lr,
                    rank=4,
                    steps=args.attack_steps,
                    data=f"world:shape={target}",
                    num_images=20,
                    save_at=save_at,
                )
                if not (attack_dir / "steps" / f"step-{args.attack_steps:08d}" / "manifest.json").is_file():
                    run_attack(model, config, attack_dir, resume=True, progress=False, world=world)
                reference = load_concept_data(
                    f"world:shape={target}", 32, 777, world, model.image_size
                ).images
                reference_features = encoder.encode_images(reference)
                curve = {}
                for step, step_dir in attack_checkpoints(attack_dir).items():
                    attacked = DiffusionModel.from_delta(step_dir)
                    rate, images = detection(attacked, classifier, world, target, args.samples, sample_steps)
                    similarity = cosine_similarity_to_references(
                        encoder.encode_images(images), reference_features
                    )
                    curve[step] = {"rate": rate, "similarity": similarity}
                rows[model_name]["targets"][target] = curve
                print(
                    f"set{size} {model_name} {target}: "
                    + ", ".join(f"{s}:{v['rate']:.0%}" for s, v in curve.items()),
                    flush=True,
                )
        base_retention = {
            s: detection(base, classifier, world, s, args.samples, sample_steps)[0] for s in others
        }
        results["sets"][size] = {
            "targets": targets,
            "rows": rows,
            "base_other_shapes": base_retention,
            "immunize_seconds": timings,
        }
        # MSGR per defence at the last attack step, against the erased model (without immunization).
        for name in defences:
            pairs = {
                t: (
                    rows["erased"]["targets"][t][args.attack_steps]["similarity"],
                    rows[name]["targets"][t][args.attack_steps]["similarity"],
                )
                for t in targets
            }
            results["sets"][size].setdefault("msgr", {})[name] = msgr(pairs)
    results["seconds"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_report(results, args.out, save_at)
    print(f"wrote {args.out / 'report.md'} in {results['seconds'] / 60:.1f} min")


def write_report(results: dict, out: Path, save_at: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Re-learning on the world model",
        "",
        "Made by `python bench/relearning.py` (settings below). UCE erases the targets (preserving the other",
        "known shapes); the defences immunize the erased model; LoRA (rank 4) then fine-tunes every model on",
        "each target's own captioned images. Detector rate = share of 32 generations (prompts naming the",
        "shape, a style and a colour) that the world classifier labels as the target.",
        "",
        f"Settings: `{json.dumps({k: v for k, v in results['settings'].items() if k not in ('work', 'out')})}`",
        "",
    ]
    sets = results["sets"]
    figure, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    for axis, (size, data) in zip(axes[0], sets.items(), strict=True):
        targets = data["targets"]
        lines += [f"## {size} targets: {', '.join(targets)}", ""]
        header = "| model | " + " | ".join(f"step {s}" for s in save_at) + " | other shapes |"
        lines += [header, "|" + "---|" * (len(save_at) + 2)]
        base_other = float(np.mean(list(data["base_other_shapes"].values())))
        for model_name, row in data["rows"].items():
            mean_curve = [float(np.mean([row["targets"][t][s]["rate"] for t in targets])) for s in save_at]
            other = float(np.mean(list(row["other_shapes"].values())))
            cells = " | ".join(f"{v:.0%}" for v in mean_curve)
            lines.append(f"| {model_name} | {cells} | {other:.0%} ({(other - base_other) * 100:+.0f} pts) |")
            axis.plot(save_at, mean_curve, marker="o", label=model_name)
        lines += [
            "",
            f"Target rate = mean over the targets. Other shapes: the {len(data['base_other_shapes'])} other",
            f"known shapes' rate before any attack (base model: {base_other:.0%}).",
            "",
        ]
        if data.get("msgr"):
            lines += ["MSGR (world encoder, at the last attack step, against the erased model):", ""]
            lines += ["| defence | MSGR |", "|---|---|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in data["msgr"].items()]
            lines.append("")
        if data.get("immunize_seconds"):
            lines += [
                "Immunization time (s): "
                + ", ".join(f"{k} {v:.0f}" for k, v in data["immunize_seconds"].items()),
                "",
            ]
        axis.set_title(f"{size} targets")
        axis.set_xlabel("LoRA attack step")
        axis.set_ylabel("detector rate on targets")
        axis.set_ylim(-0.02, 1.02)
        axis.axhline(0.2, color="grey", linestyle=":", linewidth=1)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=80, bbox_inches="tight")
    lines += ["![curves](curves.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
