"""MIMA's personalisation measures on a pipeline run (configs/personalisation.yaml): per attack method,
the target detection on the models with and without immunization, and MRSGR from the paired
generations of the two models (same prompts and seeds, world encoder):

    S_target = mean cosine(with, without) over the target concepts' generations after the attack
    S_other  = the same on the other held-out concept, taught to both models by `--other-attack`
    MRSGR    = (S_other - S_target) / S_other

    python bench/personalisation.py runs/personalisation [--other-attack lora_arrow] [--samples 32]
        [--folder-metrics]
    python bench/personalisation.py runs/pm --curves   # every attack folder's target detection per step

Detection is read from each attack folder's own evaluation (the pipeline's `eval-<hash>.csv` for the run's
evaluate settings, `--samples` overriding its count; with `--folder-metrics`, the folder's `metrics.csv`
written by `diffimmune evaluate --run FOLDER`), so it does not depend on which models the run's last
`diffimmune run` listed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffimmune.attacks.runner import attack_checkpoints, read_attack
from diffimmune.data.sources import model_world
from diffimmune.eval.evaluate import EVAL_SEED, concept_prompts, read_metrics_csv, target_concepts
from diffimmune.eval.metrics import mrsgr
from diffimmune.eval.sampling import load_png, sample_key
from diffimmune.models.diffusion_model import load_model
from diffimmune.pipeline import EvaluateSpec, evaluation_file, validate_experiment

METHODS = ("lora", "dreambooth", "textual_inversion", "custom_diffusion")


class MissingEvaluation(Exception):
    """An attack folder lacks the evaluation asked for (its message says how to make it)."""


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
    parser.add_argument(
        "--samples", type=int, help="generations per concept (default: the run's evaluate settings)"
    )
    parser.add_argument("--folder-metrics", action="store_true", help="read each attack folder's metrics.csv")
    parser.add_argument(
        "--curves",
        action="store_true",
        help="print each attack folder's target detection per saved step and the other shapes' at step 0, "
        "then stop (no MRSGR: needs no pairs)",
    )
    args = parser.parse_args()
    from diffimmune.data.sources import world_model_folder
    from diffimmune.eval.encoders import WorldEncoder
    from diffimmune.recipes.world_build import world_model_parts

    experiment = json.loads((args.run / "experiment.json").read_text())
    spec = EvaluateSpec.model_validate(experiment.get("evaluate", {}))
    if args.samples:
        spec = spec.model_copy(update={"samples": args.samples})
    settings = spec.model_dump()
    # the experiment's other targets each attack's evaluation leaves out of the other concepts (its file name)
    others_exclude = {a.name: a.others_exclude for a in validate_experiment(experiment).attacks}
    targets = [t.partition("=")[2] or t for t in experiment["targets"]]
    folders = attack_folders(args.run)

    def evaluation(name: str, attack: str):
        """(attack config, its target concepts, the rows of the attack folder's own evaluation)."""
        folder = folders[(name, attack)]
        config, _ = read_attack(folder)
        concepts = [f"{column}={value}" for column, value in target_concepts(config, None)]
        excluded = others_exclude.get(attack)
        path = (
            folder / "metrics.csv"
            if args.folder_metrics
            else evaluation_file(folder, spec, concepts, others_exclude=excluded)
        )
        if not path.is_file():
            how = (
                f"run `diffimmune evaluate --run {folder}` first"
                if args.folder_metrics
                else f"run the experiment with {name} attacked at these evaluate settings "
                f"({spec.samples} samples), or pass --folder-metrics"
            )
            raise MissingEvaluation(f"error: {path} is missing: {how}")
        return config, concepts, read_metrics_csv(path)

    def target_curve(concepts: list[str], rows: list[dict]) -> dict[int, float]:
        return {
            r["step"]: r["value"] for r in rows if r["metric"] == "detection" and r["concept"] == concepts[0]
        }

    def detection(name: str, attack: str) -> dict[int, float]:
        """The attack's target detection per saved step, from the attack folder's own evaluation."""
        _, concepts, rows = evaluation(name, attack)
        return target_curve(concepts, rows)

    def last_rate(name: str, attacks: list[str]) -> float:
        """Mean over the targets of each target's detection at its own attack's last step."""
        curves = [detection(name, a) for a in attacks]
        return sum(curve[max(curve)] for curve in curves) / len(curves)

    if args.curves:  # reads the evaluations only: no model, no encoder
        print("| model | attack (token) | target, steps | detection | max | other shapes at step 0 |")
        print("|---|---|---|---|---|---|")
        for name, attack in sorted(folders):
            try:
                config, concepts, rows = evaluation(name, attack)
            except MissingEvaluation:
                continue
            curve = target_curve(concepts, rows)
            kept = [
                r["value"]
                for r in rows
                if r["metric"] == "detection" and r["step"] == 0 and r["concept"] not in concepts
            ]
            steps = " / ".join(str(s) for s in sorted(curve))
            rates = " / ".join(f"{curve[s]:.0%}" for s in sorted(curve))
            others = f"{sum(kept) / len(kept):.0%}" if kept else "-"
            print(
                f"| {name} | {attack} ({config.token}) | {steps} | {rates} | {max(curve.values()):.0%} | {others} |"
            )
        return

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

    other = similarity(args.other_attack)
    print(f"S_other ({args.other_attack}, {args.immunized} vs {args.without}): {other:.3f}\n")
    print(
        f"| attack | target detection at the last step: {args.without} / {args.immunized} | S_target | MRSGR |"
    )
    print("|---|---|---|---|")
    missing: list[str] = []
    for method in METHODS:
        attacks = [f"{method}-{t}" for t in targets]
        if not all((args.immunized, a) in folders and (args.without, a) in folders for a in attacks):
            continue
        try:
            rates = f"{last_rate(args.without, attacks):.0%} / {last_rate(args.immunized, attacks):.0%}"
        except MissingEvaluation as error:  # the other methods' rows are still worth printing
            missing.append(str(error))
            continue
        target = sum(similarity(a) for a in attacks) / len(attacks)
        print(f"| {method} | {rates} | {target:.3f} | {mrsgr(target, other):.3f} |")
    if missing:
        raise SystemExit("\n".join(missing))


if __name__ == "__main__":
    main()
