"""How far the evaluation's other-shapes FID moves with the sampling seeds alone.

The evaluation draws 16 generations per kept shape (128 in all) from fixed seeds and reports one FID
against real images of them. This redraws the same prompts with other seed sets (draw 0 is the
evaluation's own seeds, read from the run's sample cache) and prints each model's FID per draw, its mean
and spread over draws, and its change against the erased model under the same seeds. A difference
between two defences smaller than the spread over draws is not one the evaluation can see.

The last columns pool every draw: one FID of all the draws' generations (draws x 128) against as many
real images of the kept shapes (drawn from the same world). FID from few samples is biased upwards, by
an amount that shrinks with the sample size (about as 1/N) and depends on each model's feature spread;
the pooled FID, from four times the samples at four draws, carries less of it than the per-draw values.

    python bench/fid_noise.py runs/immunization-ii-unet --models gift_unet_b1_r20_m1_u --draws 3
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from relearning_table import kept_shapes, model_name

from diffimmune.eval.encoders import WorldEncoder
from diffimmune.eval.evaluate import EVAL_SEED, concept_prompts
from diffimmune.eval.metrics import FeatureExtractor, fid_kid
from diffimmune.eval.sampling import generate_cached, weights_fingerprint
from diffimmune.models.diffusion_model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--models", default=None, help="comma-separated defence names (default: all)")
    parser.add_argument("--draws", type=int, default=3, help="seed sets (the first is the evaluation's)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    kept = kept_shapes(args.run, args.models)
    settings, sources, world, others = kept.settings, kept.sources, kept.world, kept.others
    features = FeatureExtractor(WorldEncoder(kept.classifier, normalize=False).encode_images)
    plans = [concept_prompts(world, "shape", shape, None, "sks", settings.samples) for shape in others]
    real = torch.cat([data.images for _, data in plans])
    pooled_real = torch.cat(
        [
            concept_prompts(world, "shape", shape, None, "sks", settings.samples * args.draws)[1].images
            for shape in others
        ]
    )

    scores: dict[str, list[float]] = {}
    pooled: dict[str, float] = {}
    for source in sources:
        model = load_model(source)
        shared = args.run / "shared-samples" / weights_fingerprint(model)
        name = "erased" if "/erase/" in str(source) else model_name(str(source))
        scores[name] = []
        every = []
        for draw in range(args.draws):
            images = []
            for prompts, _ in plans:
                seeds = [(EVAL_SEED + draw) * 1000 + i for i in range(len(prompts))]
                images.append(
                    generate_cached(
                        model,
                        prompts,
                        seeds,
                        None,
                        settings.steps,
                        settings.guidance_scale,
                        shared_dir=shared,
                    )
                )
            scores[name].append(fid_kid(real, torch.cat(images), features)["fid"])
            every.extend(images)
        pooled[name] = fid_kid(pooled_real, torch.cat(every), features)["fid"]
        values = ", ".join(f"{v:.1f}" for v in scores[name])
        print(f"{name}: {values}; pooled {pooled[name]:.1f}", flush=True)

    erased = scores.get("erased")
    print(
        f"\nFID of the other shapes ({len(real)} generations per draw), draw 0 = the evaluation's seeds; "
        f"pooled: all {len(real) * args.draws} generations against {len(pooled_real)} real images"
    )
    print(
        "| model | "
        + " | ".join(f"draw {d}" for d in range(args.draws))
        + " | mean | sd | change vs erased per draw | pooled | pooled change |"
    )
    print("|---|" + "---|" * (args.draws + 5))
    for name, values in scores.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        change = (
            "-"
            if erased is None or name == "erased"
            else " / ".join(f"{v / e - 1:+.0%}" for v, e in zip(values, erased, strict=True))
        )
        cells = " | ".join(f"{v:.1f}" for v in values)
        together = (
            "-" if erased is None or name == "erased" else f"{pooled[name] / pooled['erased'] - 1:+.0%}"
        )
        print(
            f"| {name} | {cells} | {statistics.mean(values):.1f} | {spread:.1f} | {change} "
            f"| {pooled[name]:.1f} | {together} |"
        )


if __name__ == "__main__":
    main()
