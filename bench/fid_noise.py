"""How far the evaluation's other-shapes FID moves between independent draws of the evaluation.

The evaluation draws 16 generations per kept shape (128 in all) from fixed captions and seeds and reports
one FID against the real images those captions describe. Each further draw here is another such
evaluation: the next 16 captions of each kept shape from the same fixed stream, their real images, and
other seeds (draw 0 is the evaluation's own, read from the run's sample cache). It prints each model's FID
per draw, its mean and spread over draws, and its change against the erased model in the same draw. A
difference between two defences smaller than the spread over draws is not one the evaluation can see.

The last columns pool every draw: one FID of all the draws' generations (draws x 128) against all their
real images, each generation paired with its real image's caption. FID from few samples is biased upwards,
by an amount that shrinks with the sample size (about as 1/N) and depends on each model's feature spread;
the pooled FID, from four times the samples at four draws, carries less of it than the per-draw values.

`--same-prompts` keeps the evaluation's captions and real images in every draw and changes only the seeds:
the spread then is the seeds' alone (no pooled column: the generations would repeat 16 captions per shape
against 16 real images).

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
    parser.add_argument("--draws", type=int, default=3, help="draws (the first is the evaluation's own)")
    parser.add_argument(
        "--same-prompts",
        action="store_true",
        help="every draw keeps the evaluation's captions; only seeds change",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)

    kept = kept_shapes(args.run, args.models)
    settings, sources, world, others = kept.settings, kept.sources, kept.world, kept.others
    features = FeatureExtractor(WorldEncoder(kept.classifier, normalize=False).encode_images)
    size = settings.samples
    # Each shape's captions and real images for every draw: draw d takes the d-th slice of one fixed stream
    # (prefix-stable, so draw 0 is the evaluation's own).
    streams = [
        concept_prompts(world, "shape", shape, None, "sks", size * (1 if args.same_prompts else args.draws))
        for shape in others
    ]

    def draw_plans(draw: int):
        start = 0 if args.same_prompts else draw * size
        return [
            (prompts[start : start + size], data.images[start : start + size]) for prompts, data in streams
        ]

    reals = [torch.cat([images for _, images in draw_plans(draw)]) for draw in range(args.draws)]
    pooled_real = torch.cat(reals)

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
            for prompts, _ in draw_plans(draw):
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
            scores[name].append(fid_kid(reals[draw], torch.cat(images), features)["fid"])
            every.extend(images)
        values = ", ".join(f"{v:.1f}" for v in scores[name])
        if not args.same_prompts:
            pooled[name] = fid_kid(pooled_real, torch.cat(every), features)["fid"]
            values += f"; pooled {pooled[name]:.1f}"
        print(f"{name}: {values}", flush=True)

    erased = scores.get("erased")
    spread_of = (
        "seeds only, the evaluation's captions" if args.same_prompts else "captions, real images and seeds"
    )
    print(
        f"\nFID of the other shapes ({len(reals[0])} generations per draw; draws differ in {spread_of}), "
        "draw 0 = the evaluation's own"
        + (
            ""
            if args.same_prompts
            else f"; pooled: all {len(pooled_real)} generations against their real images"
        )
    )
    with_pooled = not args.same_prompts
    print(
        "| model | "
        + " | ".join(f"draw {d}" for d in range(args.draws))
        + " | mean | sd | change vs erased per draw | mean change |"
        + (" pooled | pooled change |" if with_pooled else "")
    )
    print("|---|" + "---|" * (args.draws + 4 + (2 if with_pooled else 0)))
    for name, values in scores.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        mean = statistics.mean(values)
        change = mean_change = together = "-"
        if erased is not None and name != "erased":
            ratios = [v / e - 1 for v, e in zip(values, erased, strict=True)]
            change = " / ".join(f"{r:+.0%}" for r in ratios)
            mean_change = f"{statistics.mean(ratios):+.1%}"
            if with_pooled:
                together = f"{pooled[name] / pooled['erased'] - 1:+.1%}"
        cells = " | ".join(f"{v:.1f}" for v in values)
        row = f"| {name} | {cells} | {mean:.1f} | {spread:.1f} | {change} | {mean_change} |"
        if with_pooled:
            row += f" {pooled[name]:.1f} | {together} |"
        print(row)


if __name__ == "__main__":
    main()
