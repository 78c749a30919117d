"""What changes in the other shapes' generations of each defence of a world pipeline run: the detector's
accuracy on every label column (shape, style, colour, background) and each column's share of the FID.

The evaluation reports shape detection and one FID over the other shapes. A defence can keep the shapes
(detection unchanged) and still move FID a lot; this says which attribute moved. It regenerates nothing
that the evaluation already drew: the prompts and seeds are the evaluation's, so the images come from the
run's shared sample cache (`shared-samples/`), keyed by the model's weights.

For each model (the erased model, then every immunized one, before any attack): the accuracy of each
column against the labels of the prompts' records, and the Frechet distance of the generations to the
real images in the world encoder's space split into its mean term (||mu_real - mu_fake||^2: the
distribution moved as a whole) and its covariance term (it narrowed, widened or turned), with the
generations' feature spread over the real images'. The sum is the evaluation's FID up to torchmetrics'
numerics. A second table gives each shape's mean shift (its own generations against its own real
images): which of the kept concepts the defence moved.

    python bench/attribute_drift.py runs/immunization-ii-unet [--models gift_unet_b1_r20_m1_u,...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from relearning_table import kept_shapes, model_name
from scipy import linalg

from diffimmune.eval.encoders import WorldEncoder
from diffimmune.eval.evaluate import EVAL_SEED, concept_prompts
from diffimmune.eval.sampling import generate_cached, weights_fingerprint
from diffimmune.models.diffusion_model import load_model


def frechet_terms(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    """The two terms of the Frechet distance: ||mu_r - mu_f||^2 and tr(S_r + S_f - 2 (S_r S_f)^1/2)."""
    mean_term = float(np.square(real.mean(0) - fake.mean(0)).sum())
    s_real, s_fake = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = linalg.sqrtm(s_real @ s_fake)
    return mean_term, float(np.trace(s_real + s_fake - 2 * np.real(root)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--models", default=None, help="comma-separated defence names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    kept = kept_shapes(args.run, args.models)
    settings, sources, world, others, classifier = (
        kept.settings, kept.sources, kept.world, kept.others, kept.classifier
    )  # fmt: skip
    raw_encoder = WorldEncoder(classifier, normalize=False)
    plans = []
    for shape in others:
        prompts, data = concept_prompts(world, "shape", shape, None, "sks", settings.samples)
        plans.append((prompts, data))
    columns = list(plans[0][1].labels[0])
    real = torch.cat([data.images for _, data in plans])
    real_features = raw_encoder.encode_images(real).double().numpy()

    print(f"other shapes ({', '.join(others)}), {len(real)} generations per model, cached samples")
    header = " | ".join(columns)
    table = [f"| model | {header} | FID | mean term | covariance term | feature spread (fake / real) |"]
    table.append("|---|" + "---|" * (len(columns) + 4))
    shifts = ["| model | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
    for source in sources:
        model = load_model(source)
        shared = args.run / "shared-samples" / weights_fingerprint(model)
        images, labels = [], []
        for prompts, data in plans:
            seeds = [EVAL_SEED * 1000 + i for i in range(len(prompts))]
            images.append(
                generate_cached(
                    model, prompts, seeds, None, settings.steps, settings.guidance_scale, shared_dir=shared
                )
            )
            labels += data.labels
        fakes = torch.cat(images)
        predicted = classifier.predict(fakes)
        accuracy = [
            np.mean([p == row[c] for p, row in zip(predicted[c], labels, strict=True)]) for c in columns
        ]
        fake_features = raw_encoder.encode_images(fakes).double().numpy()
        mean_term, cov_term = frechet_terms(real_features, fake_features)
        spread = fake_features.std(0).mean() / real_features.std(0).mean()
        name = "erased" if "/erase/" in str(source) else model_name(str(source))
        cells = " | ".join(f"{a:.0%}" for a in accuracy)
        table.append(
            f"| {name} | {cells} | {mean_term + cov_term:.1f} | {mean_term:.1f} | {cov_term:.1f} | {spread:.2f} |"
        )
        # Per shape: how far the mean feature of its generations sits from its real images' mean.
        edges = np.cumsum([0] + [len(p) for p, _ in plans])
        per_shape = [
            np.square(fake_features[a:b].mean(0) - real_features[a:b].mean(0)).sum()
            for a, b in zip(edges[:-1], edges[1:], strict=True)
        ]
        shifts.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in per_shape) + " |")
    print("\n".join(table))
    print("\nmean shift per shape, ||mean(real) - mean(generated)||^2 in the world encoder's space:")
    print("\n".join(shifts))


if __name__ == "__main__":
    main()
