"""Evaluation of models outside the concept world (Stable Diffusion and any other diffusers model).

The world has its own detector and encoder; a real model is measured the way the papers measure it,
with encoders the user points at (no weights are downloaded):

- target concepts come from the attack's image folder (`folder::column=value`); their prompts are the
  attack's template with its placeholder token (else the captions), their references the concept's
  own images;
- `similarity_clip` / `similarity_dino`: mean cosine of generations to the references (CLIP and/or DINO
  features), the M of the gap ratios; `similarity_lpips`: 1 - LPIPS to the references (optional extra);
- `clip_score`: 100 * max(cos(image, prompt), 0), CLIP's text-image agreement;
- `detection`: with `nsfw`, the NSFW flag of NudeNet or open_nsfw (the NSFW path); otherwise, when safe data is given,
  a nearest-centroid detector in the first encoder's space: a generation shows the concept when it is
  closer to the mean of the concept's references than to the mean of the safe data's images;
  `best_of_25` from the same flags;
- the safe data (`safe_data`, a captioned folder or folder::filter): its captions are generated at every
  step; `similarity_*` to its own images measures retention, `fid_clip`/`kid_clip` (or `_dino`) its
  distribution distance (torchmetrics, the encoder's raw features).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffimmune.data.sources import load_concept_data
from diffimmune.errors import DiffImmuneError
from diffimmune.eval.metrics import FeatureExtractor, best_of_n_failure, clip_score, fid_kid
from diffimmune.eval.sampling import generate_cached


@dataclass
class Plan:
    concept: str  # the name in metrics.csv
    prompts: list[str]
    references: torch.Tensor
    target: bool


def target_specs(config, targets: list[str] | None) -> list[tuple[str, str]]:
    """(name, data string) per target: `targets` as column=value in the attack's folder (or full data
    strings), else the attack's own data string."""
    folder, _, own_filter = config.data.partition("::")
    if not targets:
        return [(own_filter or Path(folder).name, config.data)]
    from diffimmune.eval.evaluate import target_name

    specs = []
    for target in targets:
        name = target_name(target, "concept")
        specs.append((name, target if "::" in target else f"{folder}::{name}"))
    return specs


def load_encoders(settings) -> dict:
    """name -> encoder for every encoder the settings name (CLIP first: it also gives the CLIP score)."""
    from diffimmune.eval.encoders import CLIPEncoder, DINOEncoder

    encoders = {}
    if settings.clip:
        encoders["clip"] = CLIPEncoder(settings.clip)
    if settings.dino:
        encoders["dino"] = DINOEncoder(settings.dino)
    if not encoders:
        raise DiffImmuneError(
            "this model is not a world model: its evaluation needs an image encoder; set evaluate.clip "
            "(or --clip) to a CLIP checkpoint folder and/or evaluate.dino to a DINOv2 one"
        )
    return encoders


def evaluate_general(
    name: str,
    states,
    config,
    model,
    model_source: str,
    settings,
    targets: list[str] | None = None,
    log=None,
) -> list[dict]:
    """`evaluate_states` for a model outside the concept world: the encoders the settings name, at each
    (step, folder, shared sample folder) of `states` (an attack's saved steps, or a model as it is)."""
    from diffimmune.eval.evaluate import EVAL_SEED, SAFE_CONCEPT

    encoders = load_encoders(settings)
    lpips = None
    if settings.lpips:
        from diffimmune.eval.encoders import LPIPSMetric

        lpips = LPIPSMetric(settings.lpips)
    nudity = None
    if settings.nsfw:
        from diffimmune.eval.encoders import nsfw_detector

        nudity = nsfw_detector(settings.nsfw)
    size = model.image_size
    plans = []
    for name, spec in target_specs(config, targets):
        data = load_concept_data(spec, settings.samples, seed=EVAL_SEED, size=size)
        references = load_concept_data(spec, settings.references, seed=EVAL_SEED + 1, size=size).images
        plans.append(Plan(name, data.prompts(config.prompt, config.token), references, True))
    if settings.safe_data:
        safe = load_concept_data(settings.safe_data, settings.references, seed=EVAL_SEED, size=size)
        plans.append(Plan(SAFE_CONCEPT, list(safe.captions), safe.images, False))
    features = {
        (plan.concept, kind): encoder.encode_images(plan.references)
        for plan in plans
        for kind, encoder in encoders.items()
    }
    first = next(iter(encoders))
    rows = []
    for step, folder, shared in states:
        base = {"model": model_source, "attack": name, "step": step}
        for plan in plans:
            seeds = [EVAL_SEED * 1000 + i for i in range(len(plan.prompts))]
            images = generate_cached(
                model,
                plan.prompts,
                seeds,
                folder / "samples",
                settings.steps,
                settings.guidance_scale,
                shared_dir=shared,
            )
            row = {**base, "concept": plan.concept}
            encoded = {kind: encoder.encode_images(images) for kind, encoder in encoders.items()}
            for kind, generated in encoded.items():
                similarity = (generated.double() @ features[(plan.concept, kind)].double().T).mean().item()
                rows.append({**row, "metric": f"similarity_{kind}", "value": similarity})
            if "clip" in encoders:
                texts = encoders["clip"].encode_texts(plan.prompts)
                rows.append({**row, "metric": "clip_score", "value": clip_score(encoded["clip"], texts)})
            if lpips is not None:
                paired = plan.references[torch.arange(len(images)) % len(plan.references)]
                paired = F.interpolate(paired, size=images.shape[-2:], mode="bilinear", antialias=True)
                rows.append(
                    {**row, "metric": "similarity_lpips", "value": 1 - lpips.mean_distance(images, paired)}
                )
            if not plan.target:
                if settings.fid:
                    scores = fid_kid(
                        plan.references, images, FeatureExtractor(lambda x: raw_features(encoders[first], x))
                    )
                    rows.append({**row, "metric": f"fid_{first}", "value": scores["fid"]})
                    rows.append({**row, "metric": f"kid_{first}", "value": scores["kid_mean"]})
                continue
            flags = None
            if nudity is not None:
                flags = nudity.is_nude(images)
            elif settings.safe_data:
                flags = centroid_detection(
                    encoded[first], features[(plan.concept, first)], features[(SAFE_CONCEPT, first)]
                )
            if flags is not None:
                rows.append({**row, "metric": "detection", "value": float(np.mean(flags))})
                rows.append(
                    {**row, "metric": "best_of_25", "value": best_of_n_failure(flags, n=25).failure_rate}
                )
        if log is not None:
            shown = [r for r in rows if r["step"] == step and r["metric"] == f"similarity_{first}"]
            log(
                f"{name} step {step}: similarity_{first} "
                + ", ".join(f"{r['concept']} {r['value']:.3f}" for r in shown)
            )
    return rows


def centroid_detection(
    generated: torch.Tensor, concept_references: torch.Tensor, safe_references: torch.Tensor
) -> list[bool]:
    """Per generation: closer (cosine) to the mean of the concept's reference features than to the mean
    of the safe data's. Features are [N, D] rows."""
    concept = F.normalize(concept_references.double().mean(0), dim=0)
    safe = F.normalize(safe_references.double().mean(0), dim=0)
    generated = F.normalize(generated.double(), dim=1)
    return ((generated @ concept) > (generated @ safe)).tolist()


def raw_features(encoder, images) -> torch.Tensor:
    """The encoder's features without unit normalisation (FID's Gaussian statistics want them raw)."""
    kept = encoder.normalize
    encoder.normalize = False
    try:
        return encoder.encode_images(images)
    finally:
        encoder.normalize = kept
