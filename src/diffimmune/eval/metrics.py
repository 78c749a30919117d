"""Evaluation metrics as pure functions of labels, features and images.

This module owns every number the report shows about generated images: the detection rate of a target
concept, the best-of-N failure rate, the mean cosine similarity of generations to reference images,
CLIP score, FID and KID (through torchmetrics, with any image encoder as the feature extractor), and
the gap ratios of the MIMA paper (Zheng & Yeh, "Multi-concept Model Immunization through Differentiable
Model Merging"): SGR, MSGR and MRSGR. Encoders live in `eval/encoders.py`; this module only consumes
their features (or, for FID/KID, calls them through `FeatureExtractor`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffimmune.errors import DiffImmuneError
from diffimmune.eval.classifier import images_to_tensor

__all__ = [
    "BestOfN",
    "FeatureExtractor",
    "best_of_n_failure",
    "clip_score",
    "cosine_similarity_to_references",
    "detection_rate",
    "fid_kid",
    "mrsgr",
    "msgr",
    "sgr",
]


# ---------------------------------------------------------------------------------------- detection
def detection_rate(predicted: Sequence[str], target: str) -> float:
    """The fraction of generations whose predicted class is `target` (e.g. a `predict()` column)."""
    if len(predicted) == 0:
        raise DiffImmuneError(f"no predictions to measure the detection rate of '{target}' on")
    return sum(1 for name in predicted if name == target) / len(predicted)


@dataclass(frozen=True)
class BestOfN:
    """How likely an adversary who draws `n` samples is to get at least one showing the target.

    `closed_form` = 1 - (1 - p)^n from the per-sample rate p (assumes independent samples; always
    defined). `empirical` is the fraction of disjoint groups of `n` samples that hold at least one
    detection, averaged over random partitions (None when there are fewer than `n` samples).
    `failure_rate` is the closed form: it exists for any sample count and has lower variance, so runs
    with different sample counts compare; `empirical` is the check that independence is plausible.
    """

    n: int
    samples: int
    per_sample_rate: float
    closed_form: float
    empirical: float | None
    groups: int

    @property
    def failure_rate(self) -> float:
        return self.closed_form


def best_of_n_failure(
    detected: Sequence[bool] | Tensor, n: int = 25, trials: int = 100, seed: int = 0
) -> BestOfN:
    """Best-of-N failure rate from per-sample detections (True: the sample shows the target).

    The empirical estimate splits the samples into floor(S / n) disjoint groups of `n`; a group fails
    when any of its samples shows the target. Which samples share a group is arbitrary, so the fraction
    of failing groups is averaged over `trials` seeded random partitions (its expectation is the exact
    hypergeometric 1 - C(S - k, n) / C(S, n) for k detections among S samples). `trials=0` keeps the
    samples' own order (one partition, no shuffling).
    """
    if n < 1:
        raise DiffImmuneError(f"best-of-N needs n >= 1, got n={n}")
    if trials < 0:
        raise DiffImmuneError(f"best-of-N needs trials >= 0, got trials={trials}")
    flags = torch.as_tensor(detected).reshape(-1).bool()
    samples = flags.numel()
    if samples == 0:
        raise DiffImmuneError("best-of-N needs at least one sample")
    per_sample_rate = flags.float().mean().item()
    closed_form = 1.0 - (1.0 - per_sample_rate) ** n
    groups = samples // n
    empirical = None
    if groups:
        generator = torch.Generator().manual_seed(seed)
        orders = (
            [torch.arange(samples)]
            if trials == 0
            else [torch.randperm(samples, generator=generator) for _ in range(trials)]
        )
        empirical = sum(_failing_group_fraction(flags[order], n, groups) for order in orders) / len(orders)
    return BestOfN(n, samples, per_sample_rate, closed_form, empirical, groups)


def _failing_group_fraction(flags: Tensor, n: int, groups: int) -> float:
    return flags[: groups * n].reshape(groups, n).any(dim=1).float().mean().item()


# ---------------------------------------------------------------------------------------- similarity
def _check_features(features: Tensor, name: str) -> Tensor:
    if features.dim() != 2 or features.shape[0] == 0:
        raise DiffImmuneError(
            f"{name}: expected a non-empty [N, D] feature matrix, got {tuple(features.shape)}"
        )
    # float64: means of many cosines should not depend on the encoder's dtype.
    return features.detach().double()


def cosine_similarity_to_references(features: Tensor, reference_features: Tensor) -> float:
    """Mean over generations of the mean cosine similarity to every reference image ([N, D], [M, D])."""
    generated = _check_features(features, "generated features")
    references = _check_features(reference_features, "reference features")
    if generated.shape[1] != references.shape[1]:
        raise DiffImmuneError(
            f"generated features have {generated.shape[1]} dims but references {references.shape[1]}: "
            "encode both with the same encoder"
        )
    # The mean of all N x M cosines equals the mean over generations of each one's mean over references.
    similarities = F.normalize(generated, dim=1) @ F.normalize(references, dim=1).T
    return similarities.mean().item()


def clip_score(image_features: Tensor, text_features: Tensor) -> float:
    """CLIP score of paired rows: max(100 * mean_i cos(image_i, text_i), 0), as torchmetrics' CLIPScore
    (which clips the mean, not each pair)."""
    images = _check_features(image_features, "image features")
    texts = _check_features(text_features, "text features")
    if images.shape != texts.shape:
        raise DiffImmuneError(
            f"CLIP score pairs rows: image features {tuple(images.shape)} and text features "
            f"{tuple(texts.shape)} must have the same shape"
        )
    cosines = (F.normalize(images, dim=1) * F.normalize(texts, dim=1)).sum(dim=1)
    return max(100.0 * cosines.mean().item(), 0.0)


# ---------------------------------------------------------------------------------------- FID / KID
class FeatureExtractor(nn.Module):
    """Any callable `images -> [B, D]` as the `feature` module torchmetrics' FID and KID accept.

    torchmetrics (1.9) passes a custom module the images untouched (its `normalize` flag only rescales
    for the built-in Inception) and reads the feature size from a `num_features` attribute; without one
    it probes the module with a random 3x299x299 image. So this adapter states `num_features` (probing
    once with a small image if not given) and takes either float images in [0, 1] or uint8 in [0, 255].
    """

    def __init__(
        self, encode: Callable[[Tensor], Tensor], num_features: int | None = None, probe_size: int = 32
    ):
        super().__init__()
        self.encode = encode
        if num_features is None:
            probe = torch.rand(2, 3, probe_size, probe_size, generator=torch.Generator().manual_seed(0))
            num_features = int(self.forward(probe).shape[-1])
        self.num_features = int(num_features)

    def forward(self, images: Tensor) -> Tensor:
        batch = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        with torch.no_grad():
            features = self.encode(batch)
        if features.dim() != 2:
            raise DiffImmuneError(
                f"the feature extractor returned shape {tuple(features.shape)}, expected [B, D]"
            )
        # torchmetrics accumulates in float64 but casts FID back to the features' dtype: keep float64.
        return features.detach().to("cpu", torch.float64)


def fid_kid(
    real_images,
    fake_images,
    feature_extractor: nn.Module | Callable[[Tensor], Tensor],
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID between two image sets, in the feature space of `feature_extractor`.

    Images are anything `images_to_tensor` accepts ([B, 3, H, W] float in [0, 1] or uint8, arrays, PIL).
    A plain callable (an encoder's `encode_images`, a classifier's `features`) is wrapped in
    `FeatureExtractor`. FID needs more samples than feature dims for a full-rank covariance; KID draws
    `kid_subsets` random subsets of `kid_subset_size` (default min(1000, both set sizes)) with a seeded
    generator, so the same inputs give the same numbers. Returns `{fid, kid_mean, kid_std}`.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real = images_to_tensor(real_images)
    fake = images_to_tensor(fake_images)
    if len(real) < 2 or len(fake) < 2:
        raise DiffImmuneError(
            f"FID/KID need at least 2 images per set, got {len(real)} real and {len(fake)} fake"
        )
    subset_size = kid_subset_size or min(1000, len(real), len(fake))
    if not 2 <= subset_size <= min(len(real), len(fake)):
        raise DiffImmuneError(
            f"kid_subset_size={subset_size} must be between 2 and the smaller set size "
            f"({len(real)} real, {len(fake)} fake)"
        )
    extractor = (
        feature_extractor if isinstance(feature_extractor, nn.Module) else FeatureExtractor(feature_extractor)
    )
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    with warnings.catch_warnings():
        # KID warns that it keeps every feature in memory; that is the point at these sizes.
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=extractor, subsets=kid_subsets, subset_size=subset_size, normalize=True
        )
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            fid.update(batch, real=is_real)
            kid.update(batch, real=is_real)
    # KID samples its subsets with the global generator: fork it so callers' randomness is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


# ---------------------------------------------------------------------------------------- gap ratios
def _ratio(numerator: float, denominator: float, what: str) -> float:
    if not math.isfinite(denominator) or denominator <= 0:
        raise DiffImmuneError(
            f"{what} is {denominator}: a gap ratio needs a positive similarity in its denominator "
            "(check the encoder and the reference images)"
        )
    return numerator / denominator


def sgr(m_without: float, m_with: float) -> float:
    """Similarity gap ratio of one concept at one attack step (MIMA):

        SGR = (M(ref, without) - M(ref, with)) / M(ref, without)

    where M(ref, without) is the similarity to the reference images of generations from the attacked
    model *without* immunization and M(ref, with) the same *with* immunization. 0: immunization changed
    nothing; 1: the immunized model's generations share nothing with the references.
    """
    m_without, m_with = float(m_without), float(m_with)
    return _ratio(m_without - m_with, m_without, "M(ref, without immunization)")


def msgr(pairs: Mapping[str, tuple[float, float]]) -> float:
    """Mean SGR over target concepts: `pairs` maps each concept to (M(ref, without), M(ref, with))."""
    if not pairs:
        raise DiffImmuneError("MSGR needs at least one target concept")
    ratios = []
    for concept, (m_without, m_with) in pairs.items():
        try:
            ratios.append(sgr(m_without, m_with))
        except DiffImmuneError as error:
            raise DiffImmuneError(f"concept '{concept}': {error}") from None
    return sum(ratios) / len(ratios)


def mrsgr(similarity_target: float, similarity_other: float) -> float:
    """Relative similarity gap ratio (MIMA, personalisation): the immunized model should fail to learn
    the target concepts yet still learn other concepts.

        MRSGR = (similarity_other - similarity_target) / similarity_other

    Both similarities compare generations of the models with and without immunization (after the same
    attack): `similarity_target` on target concepts, `similarity_other` on other concepts. High when the
    immunized model diverges from the unprotected one on targets only.
    """
    similarity_target, similarity_other = float(similarity_target), float(similarity_other)
    return _ratio(similarity_other - similarity_target, similarity_other, "the similarity on other concepts")
