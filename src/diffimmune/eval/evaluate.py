"""Evaluate attack runs: every metric at every saved attack step, in one long-format table.

For each attack folder (attack.json + steps/), the attacked model is loaded once and each saved step's
delta applied in turn; generations come from `generate_cached` with the same seeds at every step and for
every model, so differences are the models'. Rows: model, attack, step, concept, metric, value.

Metrics per step:
- target concepts (from the attack's data filter or `targets`): `detection` (the detector finds the
  concept), `similarity_world` (cosine of world-encoder features to reference images of the concept),
  `best_of_25` (probability that at least one of 25 samples shows it);
- other known concepts (safe-concept retention): `detection` and `similarity_world` per concept;
- `fid_world` / `kid_world` of the other concepts' generations against real images of them.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from diffimmune.attacks.runner import attack_checkpoints, read_attack
from diffimmune.data.sources import load_concept_data, model_world, parse_filter, world_model_folder
from diffimmune.errors import DiffImmuneError
from diffimmune.eval.metrics import (
    FeatureExtractor,
    best_of_n_failure,
    cosine_similarity_to_references,
    fid_kid,
)
from diffimmune.eval.sampling import generate_cached, weights_fingerprint
from diffimmune.files import atomic_file

COLUMNS = ("model", "attack", "step", "concept", "metric", "value")
EVAL_SEED = 777
SAFE_CONCEPT = "safe"  # the concept of the rows measured on safe generations (FID/KID)
SHARED_SAMPLES = "shared-samples"  # under a run folder: generations keyed by the weights that made them


@dataclass
class EvalSettings:
    samples: int = 16
    steps: int = 25
    guidance_scale: float = 4.0
    references: int = 32
    other_concepts: int | None = None  # None: every other known shape
    other_concepts_at: str = "every"  # "start": the other concepts only at the first saved step
    fid: bool = True
    # Models outside the concept world (eval/general.py): encoders, safe data, the NSFW path.
    clip: str | None = None  # a CLIP checkpoint folder: similarity_clip, clip_score, FID in CLIP space
    dino: str | None = None  # a DINOv2 checkpoint folder: similarity_dino
    lpips: str | None = None  # an LPIPS backbone (alex, vgg): similarity_lpips (extra diffimmune[lpips])
    nsfw: str | None = None  # detection by an NSFW detector: nudenet (extra [nsfw]) or opennsfw ([opennsfw])
    safe_data: str | None = None  # a captioned folder[::filter] of concepts to keep: retention and FID


GENERAL_FIELDS = ("clip", "dino", "lpips", "nsfw", "safe_data")


def find_attack_folders(run: Path) -> list[Path]:
    run = Path(run)
    if not run.is_dir():
        raise DiffImmuneError(f"run folder {run} does not exist")
    if (run / "attack.json").is_file():
        return [run]
    found = sorted(p.parent for p in run.rglob("attack.json"))
    if not found:
        raise DiffImmuneError(f"{run} holds no attack folders (attack.json); run diffimmune attack first")
    return found


def target_concepts(config, targets: list[str] | None) -> list[tuple[str, str]]:
    """(column, value) pairs: explicit targets, else the attack data's positive world filter."""
    if targets:
        return [_single(t) for t in targets]
    if config.data.startswith("world:"):
        column, negate, values = parse_filter(config.data.removeprefix("world:"))
        if not negate:
            return [(column, v) for v in values]
    return []


def _single(text: str, default_column: str = "shape") -> tuple[str, str]:
    column, negate, values = parse_filter(text, default_column=default_column)
    if negate or len(values) != 1:
        example = "shape=heart" if default_column == "shape" else f"{default_column}=van_gogh"
        raise DiffImmuneError(f"target '{text}' must name one concept, like {example}")
    return column, values[0]


def target_name(target: str, default_column: str = "shape") -> str:
    """The concept name a target's rows carry: column=value (a bare value takes `default_column`: shape on
    the world, concept outside it), or for a data string FOLDER::column=value the part after '::'."""
    if "::" in target:
        return target.partition("::")[2] or target
    return "=".join(_single(target, default_column))


def concept_prompts(world, column: str, value: str, template: str | None, token: str, count: int):
    """Evaluation prompts for a concept (fixed seed): the attack's template, else world captions."""
    data = load_concept_data(f"world:{column}={value}", count, seed=EVAL_SEED, world=world)
    return data.prompts(template, token), data


def evaluate_attack(
    attack_dir: Path,
    settings: EvalSettings,
    targets: list[str] | None = None,
    classifier=None,
    log=None,
    shared_samples: Path | None = None,
    others_exclude: list[str] | None = None,
):
    """Rows of metrics for every saved step of one attack. With `shared_samples`, generations are also
    cached under shared_samples/<weights fingerprint>/, so identical model states across attacks (every
    attack's step 0 on one model) are sampled once. A model outside the concept world is measured by
    `eval.general.evaluate_general` with the encoders the settings name. `others_exclude`: concepts
    (column=value) not read among the other concepts though not this attack's targets (an experiment's
    other targets)."""
    from diffimmune.models.diffusion_model import load_model

    config, model_source = read_attack(attack_dir)
    model = load_model(model_source, device="cpu")
    states = checkpoint_states(model, attack_dir, shared_samples)
    return evaluate_states(
        model,
        model_source,
        config,
        attack_dir.name,
        states,
        settings,
        targets,
        classifier,
        log,
        others_exclude,
    )


def evaluate_model(
    source: str, out_dir: Path, settings: EvalSettings, targets: list[str], log=None, **load_options
):
    """A model as it is, before any attack (a release candidate): the rows an attack's step 0 would have
    (the same prompts and seeds), with attack "-", its samples under out_dir/samples. `targets` are required
    (no attack data names them): column=value on the world, a data string FOLDER::column=value outside it;
    the other concepts are read for retention as an attack's evaluation reads them."""
    from diffimmune.models.diffusion_model import load_model

    if not targets:
        raise DiffImmuneError(
            "a model evaluated without an attack needs its targets: pass --target shape=star"
        )
    model = load_model(source, device="cpu", **load_options)
    # What an attack's config tells the evaluation: the prompts are the data's captions, the targets given.
    config = SimpleNamespace(prompt=None, token="sks", data="")
    source = getattr(model, "source", None) or str(source)
    return evaluate_states(
        model, source, config, "-", [(0, Path(out_dir), None)], settings, targets, None, log
    )


def evaluate_models(
    sources: list[str], out_dir: Path, settings: EvalSettings, targets: list[str], log=None
) -> tuple[Path, list[str]]:
    """`evaluate_model` for each source (samples under out_dir/<n>-<name>/), one metrics.csv, and a table
    to print: each model's target detection, its kept concepts' mean detection and its FID on them, side by
    side (what to read before releasing an immunized model beside the model it was made from)."""
    out_dir = Path(out_dir)
    rows = []
    for index, source in enumerate(sources):
        path = Path(source)
        label = path.parent.name if path.name in ("delta", "") else path.name
        rows += evaluate_model(source, out_dir / f"{index}-{label}", settings, targets, log=log)
    metrics = write_metrics_csv(rows, out_dir / "metrics.csv")
    return metrics, model_table(rows, targets)


def model_table(rows: list[dict], targets: list[str]) -> list[str]:
    """A markdown table of `evaluate_models`' rows: per model, each target's detection, the mean detection
    of the other concepts it read, and the FID of their generations."""
    read = {r["concept"] for r in rows}
    wanted = set()
    for target in targets:  # named as the world names it, or as a folder's concepts are, whichever was read
        names = [target_name(target, column) for column in ("shape", "concept")]
        wanted.add(next((n for n in names if n in read), names[0]))
    models = list(dict.fromkeys(r["model"] for r in rows))
    header = [
        "model",
        *[f"{t} detection" for t in sorted(wanted)],
        "kept concepts (mean detection)",
        "FID kept",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        own = [r for r in rows if r["model"] == model]
        detection = {r["concept"]: r["value"] for r in own if r["metric"] == "detection"}
        kept = [v for c, v in detection.items() if c not in wanted and c != SAFE_CONCEPT]
        fid = [r["value"] for r in own if r["concept"] == SAFE_CONCEPT and r["metric"].startswith("fid_")]
        cells = [model, *[f"{detection[t]:.0%}" if t in detection else "-" for t in sorted(wanted)]]
        cells.append(f"{sum(kept) / len(kept):.1%} of {len(kept)}" if kept else "-")
        cells.append(f"{fid[0]:.2f}" if fid else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def other_shapes(world, concepts: list[str], count: int | None) -> list[str]:
    """The known shapes an evaluation reads as the other (kept) concepts: the world's known shapes that are
    none of `concepts` (column=value: the attack's targets and the experiment's other targets), the first
    `count` of them (None: all). The pipeline counts its images with the same list."""
    skip = {concept.partition("=")[2] for concept in concepts if concept.startswith("shape=")}
    return [shape for shape in world.known_shapes if shape not in skip][:count]


def evaluate_states(
    model,
    model_source: str,
    config,
    name: str,
    states,
    settings,
    targets,
    classifier,
    log,
    others_exclude=None,
):
    """Rows of metrics for `model` at each (step, folder, shared sample folder) of `states` (the model
    holding that step's weights as it is yielded); `config` gives the prompts' template, token and data;
    `others_exclude` (column=value) are not read among the other concepts."""
    from diffimmune.eval.encoders import WorldEncoder
    from diffimmune.recipes.world_build import world_model_parts

    world = model_world(model)
    if world is None:
        from diffimmune.eval.general import evaluate_general

        return evaluate_general(name, states, config, model, model_source, settings, targets, log=log)
    classifier = classifier or world_model_parts(world_model_folder(model))[1]
    encoder = WorldEncoder(classifier)
    raw_encoder = WorldEncoder(classifier, normalize=False)
    targets_list = target_concepts(config, targets)
    read = [f"{column}={value}" for column, value in targets_list]
    others = other_shapes(world, [*read, *(others_exclude or [])], settings.other_concepts)
    # Prompts and references are fixed once; every step and every model sees the same ones.
    plans = []
    for column, value in targets_list:
        prompts, data = concept_prompts(world, column, value, config.prompt, config.token, settings.samples)
        references = load_concept_data(
            f"world:{column}={value}", settings.references, seed=EVAL_SEED + 1, world=world
        )
        plans.append(("target", column, value, prompts, references.images))
    for shape in others:
        prompts, data = concept_prompts(world, "shape", shape, None, config.token, settings.samples)
        plans.append(("other", "shape", shape, prompts, data.images))
    reference_features = {(c, v): encoder.encode_images(refs) for _, c, v, _, refs in plans}
    rows = []
    for index, (step, folder, shared) in enumerate(states):
        other_fakes, other_reals = [], []
        for kind, column, value, prompts, references in plans:
            if kind == "other" and index > 0 and settings.other_concepts_at == "start":
                continue
            seeds = [EVAL_SEED * 1000 + i for i in range(len(prompts))]
            images = generate_cached(
                model,
                prompts,
                seeds,
                folder / "samples",
                settings.steps,
                settings.guidance_scale,
                shared_dir=shared,
            )
            detected = [p == value for p in classifier.predict(images)[column]]
            similarity = cosine_similarity_to_references(
                encoder.encode_images(images), reference_features[(column, value)]
            )
            concept = f"{column}={value}"
            base = {"model": model_source, "attack": name, "step": step, "concept": concept}
            rows.append({**base, "metric": "detection", "value": float(np.mean(detected))})
            rows.append({**base, "metric": "similarity_world", "value": similarity})
            if kind == "target":
                rows.append(
                    {**base, "metric": "best_of_25", "value": best_of_n_failure(detected, n=25).failure_rate}
                )
            else:
                other_fakes.append(images)
                other_reals.append(references)
        if settings.fid and other_fakes:
            scores = fid_kid(
                torch.cat(other_reals), torch.cat(other_fakes), FeatureExtractor(raw_encoder.encode_images)
            )
            base = {"model": model_source, "attack": name, "step": step, "concept": SAFE_CONCEPT}
            rows.append({**base, "metric": "fid_world", "value": scores["fid"]})
            rows.append({**base, "metric": "kid_world", "value": scores["kid_mean"]})
        if log is not None:
            summary = ", ".join(
                f"{r['concept']} {r['value']:.0%}"
                for r in rows
                if r["step"] == step and r["metric"] == "detection" and r["attack"] == name
            )
            log(f"{name} step {step}: detection {summary}")
    return rows


def checkpoint_states(model, attack_dir: Path, shared_samples: Path | None):
    """Yield (step, checkpoint folder, shared sample folder or None) with `model` holding that step's
    weights: the attacked model with the step's delta applied on a fresh copy of its own values."""
    base_values = {n: t.detach().clone() for n, t in model.named_parameters().items()}
    for step, folder in attack_checkpoints(attack_dir).items():
        model.load_parameters(base_values)
        model.load_delta(folder)
        shared = shared_samples / weights_fingerprint(model) if shared_samples is not None else None
        yield step, folder, shared


def write_metrics_csv(rows: list[dict], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_file(path) as temporary:
        temporary.write_text(buffer.getvalue())
    return path


def read_metrics_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["step"] = int(row["step"])
        row["value"] = float(row["value"])
    return rows


def evaluate_run(
    run: Path, settings: EvalSettings | None = None, targets: list[str] | None = None, log=None
) -> Path:
    settings = settings or EvalSettings()
    rows = []
    shared = Path(run) / SHARED_SAMPLES
    for folder in find_attack_folders(run):
        rows.extend(evaluate_attack(folder, settings, targets, log=log, shared_samples=shared))
    return write_metrics_csv(rows, Path(run) / "metrics.csv")
