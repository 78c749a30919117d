"""The re-learning table of a pipeline run (configs/relearning-N.yaml, per-target LoRA attacks): per model,
target detection at every saved step (mean over the per-target attacks), its maximum, the other shapes'
detection before any attack (left empty when the evaluation reads only some of them, `other_concepts: N`),
FID of the other shapes before any attack (world encoder) and MSGR against the erased model at the last step.
Prints the markdown rows and writes table.json beside --out.

    python bench/relearning_table.py runs/relearning-3 --out docs/relearning/relearning-3/table.json

`--attack NAME` picks the per-target attacks NAME-<target> (default lora) when the experiment lists
several, e.g. the same LoRA at another learning rate or seed.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from readme_results import relearning_rows

from diffimmune.eval.evaluate import SAFE_CONCEPT, EvalSettings, read_metrics_csv
from diffimmune.eval.metrics import msgr

ERASED = "erased"


def model_name(source: str) -> str:
    """A pipeline run's model folder -> its name in the experiment (run/erase/uce-<hash> is 'erased',
    run/immunize/<name>-<hash>/delta is <name>)."""
    parts = Path(source).parts
    if "erase" in parts:
        return ERASED
    if "immunize" in parts:
        return parts[parts.index("immunize") + 1].rsplit("-", 1)[0]
    return Path(source).name


def run_experiment(run: Path) -> tuple[list[str], EvalSettings]:
    """A pipeline run's target names (star, not shape=star) and evaluation settings."""
    experiment = json.loads((run / "experiment.json").read_text())
    targets = [t.partition("=")[2] or t for t in experiment["targets"]]
    return targets, EvalSettings(**experiment.get("evaluate", {}))


def run_models(run: Path, models: str | None = None) -> list[Path]:
    """The erased model's folder, then the chosen defences' delta folders (see `defence_deltas`)."""
    return sorted((run / "erase").glob("*-*")) + defence_deltas(run, models)


@dataclass
class KeptShapes:
    """What the benchmarks of the kept (other) shapes read from a pipeline run: its evaluation settings,
    its models (the erased one first), the world, the world's detector, and the kept shapes the
    evaluation draws."""

    settings: EvalSettings
    sources: list[Path]
    world: object
    classifier: object
    others: list[str]


def kept_shapes(run: Path, models: str | None = None) -> KeptShapes:
    from diffimmune.data.sources import model_world, world_model_folder
    from diffimmune.models.diffusion_model import load_model
    from diffimmune.recipes.world_build import world_model_parts

    targets, settings = run_experiment(run)
    sources = run_models(run, models)
    first = load_model(sources[0])
    world = model_world(first)
    classifier = world_model_parts(world_model_folder(first))[1]
    others = [s for s in world.known_shapes if s not in targets][: settings.other_concepts]
    return KeptShapes(settings, sources, world, classifier, others)


def defence_deltas(run: Path, models: str | None = None) -> list[Path]:
    """A pipeline run's immunized models (their delta folders), sorted; `models`: a comma-separated
    subset of defence names (None: all)."""
    chosen = None if models is None else set(models.split(","))
    return sorted(
        d / "delta"
        for d in (run / "immunize").glob("*-*")
        if (d / "delta").is_dir() and (chosen is None or model_name(str(d / "delta")) in chosen)
    )


def metric_series(run: Path) -> dict:
    """(model name, attack, concept, metric) -> {step: value}, from the run's metrics.csv."""
    series: dict = defaultdict(dict)
    for row in read_metrics_csv(run / "metrics.csv"):
        key = (model_name(row["model"]), row["attack"], row["concept"], row["metric"])
        series[key][row["step"]] = row["value"]
    return series


def require_attacks(run: Path, series: dict, attacks: list[str], targets: list[str]) -> None:
    """Exit with a one-line error when the run's metrics have none of the per-target attacks
    NAME-<target> asked for, naming the ones they have."""
    have = {key[1] for key in series}
    if not have & {f"{a}-{t}" for a in attacks for t in targets}:
        found = sorted({name.rsplit("-", 1)[0] for name in have if "-" in name})
        raise SystemExit(
            f"error: {run / 'metrics.csv'} has no per-target attack {', '.join(attacks)}; it has: "
            f"{', '.join(found)} (pass --attack / --attacks)"
        )


def relearning_table(run: Path, attack: str = "lora") -> dict:
    experiment = json.loads((run / "experiment.json").read_text())
    targets = [t.partition("=")[2] or t for t in experiment["targets"]]
    series = metric_series(run)
    models = sorted({k[0] for k in series}, key=lambda m: (m != ERASED, m))
    require_attacks(run, series, [attack], targets)
    every_other = experiment.get("evaluate", {}).get("other_concepts") is None
    table = {}
    for model in models:
        per_target = {t: series.get((model, f"{attack}-{t}", f"shape={t}", "detection")) for t in targets}
        if not all(per_target.values()):  # this model was not attacked so
            continue
        steps = sorted(set.intersection(*(set(curve) for curve in per_target.values())))
        detection = [float(np.mean([per_target[t][s] for t in per_target])) for s in steps]
        others = [
            curve[0]
            for (m, _a, concept, metric), curve in series.items()
            if m == model
            and metric == "detection"
            and concept.partition("=")[2] not in targets
            and 0 in curve
        ]
        fid = [
            curve[0]
            for (m, _a, c, metric), curve in series.items()
            if m == model and c == SAFE_CONCEPT and metric == "fid_world"
        ]
        row = {
            "steps": steps,
            "detection": detection,
            "max": max(detection),
            # with `other_concepts: N` the evaluation reads only the first N kept shapes: no retention figure
            "other_shapes": float(np.mean(others)) if others and every_other else None,
            "fid": float(np.mean(fid)) if fid else None,
            "msgr": None,
        }
        if model != ERASED:
            last = steps[-1]
            pairs = {}
            for t in targets:
                concept, name = f"shape={t}", f"{attack}-{t}"
                erased = series.get((ERASED, name, concept, "similarity_world"), {})
                mine = series.get((model, name, concept, "similarity_world"), {})
                if last in erased and last in mine:
                    pairs[concept] = (erased[last], mine[last])
            row["msgr"] = msgr(pairs) if pairs else None
        table[model] = row
    # The experiment's name (its configs/NAME.yaml), whatever folder it was run into.
    record = run / "experiment.json"
    name = json.loads(record.read_text()).get("name", run.name) if record.is_file() else run.name
    return {"run": name, "targets": targets, "models": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="table.json to write")
    parser.add_argument("--attack", default="lora", help="the per-target attacks' name (NAME-<target>)")
    args = parser.parse_args()
    table = relearning_table(args.run, args.attack)
    print("\n".join(relearning_rows(table)))
    if args.out:
        args.out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
