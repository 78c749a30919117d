"""MIMA's personalisation measures on a pipeline run (configs/personalisation.yaml): per attack method,
the target detection on the models with and without immunization, and MRSGR from the paired
generations of the two models (same prompts and seeds, world encoder):

    S_target = mean cosine(with, without) over the target concepts' generations after the attack
    S_other  = the same on the other held-out concept, taught to both models by `--other-attack`
    MRSGR    = (S_other - S_target) / S_other

    python bench/personalisation.py runs/personalisation [--other-attack lora_arrow]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from diffimmune.attacks.runner import attack_checkpoints, read_attack
from diffimmune.data.sources import model_world
from diffimmune.eval.evaluate import EVAL_SEED, concept_prompts, read_metrics_csv, target_concepts
from diffimmune.eval.metrics import mrsgr
from diffimmune.eval.sampling import load_png, sample_key
from diffimmune.models.diffusion_model import load_model

METHODS = ("lora", "dreambooth", "textual_inversion", "custom_diffusion")


def attack_folders(run: Path) -> dict[tuple[str, str], Path]:
    """(model name, attack name) -> attack folder, from run/attacks/<model>-<hash>/<attack>."""
    found = {}
    for path in sorted((run / "attacks").glob("*/*/attack.json")):
        model = path.parent.parent.name.rsplit("-", 1)[0]
        found[(model, path.parent.name)] = path.parent
    return found


def paired_similarity(first: Path, second: Path, encoder, world, samples: int, settings: dict) -> float:
    """Mean cosine similarity (world encoder) between two attack folders' generations of the attack's
    target concept at their last saved step: the same prompts and seeds, so the same file names."""
    config, _ = read_attack(first)
    ((column, value),) = target_concepts(config, None)
    prompts, _ = concept_prompts(world, column, value, config.prompt, config.token, samples)
    keys = [
        sample_key(p, EVAL_SEED * 1000 + i, settings["steps"], settings["guidance_scale"], "ddim")
        for i, p in enumerate(prompts)
    ]
    features = []
    for folder in (first, second):
        saved = attack_checkpoints(folder)
        last = saved[max(saved)]
        images = torch.stack([load_png(last / "samples" / f"{key}.png") for key in keys])
        features.append(encoder.encode_images(images))
    return (features[0] * features[1]).sum(dim=1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--other-attack", default="lora_arrow")
    parser.add_argument("--immunized", default="mima")
    parser.add_argument("--without", default="base")
    args = parser.parse_args()
    from diffimmune.data.sources import world_model_folder
    from diffimmune.eval.encoders import WorldEncoder
    from diffimmune.recipes.world_build import world_model_parts

    experiment = json.loads((args.run / "experiment.json").read_text())
    settings = {"steps": 25, "guidance_scale": 4.0, "samples": 16, **experiment.get("evaluate", {})}
    targets = [t.partition("=")[2] or t for t in experiment["targets"]]
    folders = attack_folders(args.run)
    model = load_model(read_attack(next(iter(folders.values())))[1], device="cpu")
    world = model_world(model)
    encoder = WorldEncoder(world_model_parts(world_model_folder(model))[1])

    def similarity(attack: str) -> float:
        return paired_similarity(
            folders[(args.immunized, attack)],
            folders[(args.without, attack)],
            encoder,
            world,
            settings["samples"],
            settings,
        )

    names = {read_attack(folder)[1]: model for (model, _attack), folder in folders.items()}
    detection: dict = defaultdict(dict)  # (model name, attack, concept) -> {step: rate}
    for row in read_metrics_csv(args.run / "metrics.csv"):
        if row["metric"] == "detection":
            detection[(names[row["model"]], row["attack"], row["concept"])][row["step"]] = row["value"]

    def last_rate(model: str, attacks: list[str]) -> float:
        """Mean over the targets of each target's detection at its own attack's last step."""
        curves = [detection[(model, a, f"shape={t}")] for a, t in zip(attacks, targets, strict=True)]
        if not all(curves):
            raise SystemExit(
                f"error: {args.run / 'metrics.csv'} has no detection rows for {model} under {', '.join(attacks)}: "
                "it holds the models of the run's last `diffimmune run`; run the experiment again (cached) "
                f"with {model} among its attack_models"
            )
        return sum(curve[max(curve)] for curve in curves) / len(curves)

    other = similarity(args.other_attack)
    print(f"S_other ({args.other_attack}, {args.immunized} vs {args.without}): {other:.3f}\n")
    print(
        f"| attack | target detection at the last step: {args.without} / {args.immunized} | S_target | MRSGR |"
    )
    print("|---|---|---|---|")
    for method in METHODS:
        attacks = [f"{method}-{t}" for t in targets]
        if not all((args.immunized, a) in folders and (args.without, a) in folders for a in attacks):
            continue
        target = sum(similarity(a) for a in attacks) / len(attacks)
        rates = f"{last_rate(args.without, attacks):.0%} / {last_rate(args.immunized, attacks):.0%}"
        print(f"| {method} | {rates} | {target:.3f} | {mrsgr(target, other):.3f} |")


if __name__ == "__main__":
    main()
