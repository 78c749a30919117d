"""Metrics: detection rate, best-of-N, cosine similarity, CLIP score, FID/KID with a custom feature
extractor, and MIMA's gap ratios SGR, MSGR and MRSGR, each checked on inputs worked out by hand."""

import math

import pytest
import torch

from diffimmune.errors import DiffImmuneError
from diffimmune.eval.metrics import (
    FeatureExtractor,
    best_of_n_failure,
    clip_score,
    cosine_similarity_to_references,
    detection_rate,
    fid_kid,
    mrsgr,
    msgr,
    sgr,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------- detection
def test_detection_rate_is_the_fraction_predicted_as_target():
    # 2 of 4 predictions are "star".
    assert detection_rate(["star", "circle", "star", "square"], "star") == 0.5


def test_detection_rate_of_no_predictions_is_an_error():
    with pytest.raises(DiffImmuneError, match="star"):
        detection_rate([], "star")


def test_best_of_n_closed_form_from_per_sample_rate():
    # p = 1/10, N = 25: 1 - 0.9^25 = 1 - 0.0717898 = 0.9282102.
    result = best_of_n_failure([True] + [False] * 9, n=25)
    assert result.per_sample_rate == pytest.approx(0.1)
    assert result.closed_form == pytest.approx(0.9282102, abs=1e-6)
    assert result.failure_rate == result.closed_form
    # 10 samples cannot fill one group of 25.
    assert result.empirical is None and result.groups == 0


def test_best_of_n_empirical_over_disjoint_groups_in_order():
    # 8 samples, n = 2, kept in order: groups (T,F) (F,F) (F,T) (F,F) -> 2 of 4 groups fail = 0.5.
    # Closed form: p = 2/8 = 0.25, 1 - 0.75^2 = 0.4375.
    detected = torch.tensor([1, 0, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    result = best_of_n_failure(detected, n=2, trials=0)
    assert result.groups == 4
    assert result.empirical == pytest.approx(0.5)
    assert result.closed_form == pytest.approx(0.4375)


def test_best_of_n_empirical_averages_partitions_towards_the_hypergeometric_value():
    # k = 2 detections among S = 8, n = 2: a random pair misses both with C(6,2)/C(8,2) = 15/28,
    # so the expected failing fraction is 13/28 = 0.4643.
    detected = [True, True, False, False, False, False, False, False]
    result = best_of_n_failure(detected, n=2, trials=2000)
    assert result.empirical == pytest.approx(13 / 28, abs=0.02)


def test_best_of_n_is_certain_or_impossible_at_the_extremes():
    assert best_of_n_failure([True] * 50, n=25).closed_form == 1.0
    never = best_of_n_failure([False] * 50, n=25)
    assert never.closed_form == 0.0 and never.empirical == 0.0


# ---------------------------------------------------------------------------------------- similarity
def test_cosine_similarity_of_identical_vectors_is_one_whatever_their_length():
    features = torch.tensor([[1.0, 2.0, 3.0]])
    assert cosine_similarity_to_references(features, 5 * features) == pytest.approx(1.0)


def test_cosine_similarity_of_orthogonal_vectors_is_zero():
    assert cosine_similarity_to_references(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])) == 0.0


def test_cosine_similarity_is_the_mean_over_generations_and_references():
    # Generation 1 = e1: cosines to references (e1, e2) are (1, 0) -> mean 0.5.
    # Generation 2 = (1, 1)/sqrt2: cosines (1/sqrt2, 1/sqrt2) -> mean 0.7071.
    # Mean over generations: (0.5 + 0.7071) / 2 = 0.6036.
    generated = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    references = torch.eye(2)
    expected = (0.5 + 1 / math.sqrt(2)) / 2
    assert cosine_similarity_to_references(generated, references) == pytest.approx(expected)


def test_cosine_similarity_needs_features_of_the_same_width():
    with pytest.raises(DiffImmuneError, match="same encoder"):
        cosine_similarity_to_references(torch.ones(2, 3), torch.ones(2, 4))


def test_clip_score_is_a_hundred_times_the_mean_paired_cosine():
    # Pairs: (e1, e1) cos 1, (e1, e2) cos 0 -> 100 * 0.5 = 50.
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    texts = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert clip_score(images, texts) == pytest.approx(50.0)


def test_clip_score_is_clipped_at_zero():
    # Opposite vectors: cos -1 -> 100 * -1, clipped to 0.
    assert clip_score(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])) == 0.0


# ---------------------------------------------------------------------------------------- FID / KID
IMAGE_SIZE = 8
FEATURES = 64
SAMPLES = 200


@pytest.fixture(scope="module")
def linear_extractor():
    """A fixed random linear map from 3x8x8 images to 64 features: FID's Gaussians are exact images of
    the pixel distributions, and 200 samples > 64 dims keep the covariances full rank."""
    weight = torch.randn(3 * IMAGE_SIZE * IMAGE_SIZE, FEATURES, generator=torch.Generator().manual_seed(1))
    weight = weight / math.sqrt(weight.shape[0])
    return FeatureExtractor(lambda images: images.flatten(1) @ weight, num_features=FEATURES)


@pytest.fixture(scope="module")
def real_images():
    return torch.rand(SAMPLES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))


def test_fid_and_kid_of_a_set_with_itself_are_zero(linear_extractor, real_images):
    scores = fid_kid(real_images, real_images, linear_extractor, kid_subset_size=100, kid_subsets=10)
    assert abs(scores["fid"]) < 1e-4
    # Each KID subset compares two random draws from the same set: unbiased MMD near 0.
    assert abs(scores["kid_mean"]) < 1e-2


def test_fid_and_kid_grow_with_a_shift(linear_extractor, real_images):
    scores = [
        fid_kid(
            real_images,
            (real_images + shift).clamp(0, 1),
            linear_extractor,
            kid_subset_size=100,
            kid_subsets=10,
        )
        for shift in (0.0, 0.1, 0.3)
    ]
    fids = [score["fid"] for score in scores]
    kids = [score["kid_mean"] for score in scores]
    assert fids[0] < fids[1] < fids[2]
    assert kids[0] < kids[1] < kids[2]


def test_fid_kid_takes_uint8_images_like_floats(linear_extractor, real_images):
    as_bytes = (real_images * 255).round().to(torch.uint8)
    shifted = (as_bytes.int() + 20).clamp(0, 255).to(torch.uint8)
    from_bytes = fid_kid(as_bytes, shifted, linear_extractor, kid_subset_size=50, kid_subsets=5)
    from_floats = fid_kid(
        as_bytes.float() / 255, shifted.float() / 255, linear_extractor, kid_subset_size=50, kid_subsets=5
    )
    assert from_bytes["fid"] == pytest.approx(from_floats["fid"], rel=1e-5)
    assert from_bytes["kid_mean"] == pytest.approx(from_floats["kid_mean"], rel=1e-5)


def test_fid_kid_is_reproducible_with_a_seed(linear_extractor, real_images):
    shifted = (real_images + 0.1).clamp(0, 1)
    first = fid_kid(real_images, shifted, linear_extractor, kid_subset_size=50, kid_subsets=5, seed=3)
    second = fid_kid(real_images, shifted, linear_extractor, kid_subset_size=50, kid_subsets=5, seed=3)
    assert first == second


def test_feature_extractor_probes_its_feature_size():
    extractor = FeatureExtractor(lambda images: images.mean(dim=(2, 3)))
    assert extractor.num_features == 3


def test_kid_subset_larger_than_a_set_is_an_error(linear_extractor, real_images):
    with pytest.raises(DiffImmuneError, match="kid_subset_size"):
        fid_kid(real_images[:10], real_images[:10], linear_extractor, kid_subset_size=20)


# ---------------------------------------------------------------------------------------- gap ratios
def test_sgr_is_the_relative_similarity_drop():
    # (0.8 - 0.2) / 0.8 = 0.75.
    assert sgr(0.8, 0.2) == pytest.approx(0.75)
    # No effect: (0.5 - 0.5) / 0.5 = 0.
    assert sgr(0.5, 0.5) == 0.0


def test_msgr_is_the_mean_sgr_over_target_concepts():
    # star: (0.8 - 0.2) / 0.8 = 0.75; circle: (0.5 - 0.4) / 0.5 = 0.2; mean = 0.475.
    assert msgr({"star": (0.8, 0.2), "circle": (0.5, 0.4)}) == pytest.approx(0.475)


def test_mrsgr_compares_target_to_other_concepts():
    # Target similarity 0.3, other concepts 0.9: (0.9 - 0.3) / 0.9 = 2/3.
    assert mrsgr(0.3, 0.9) == pytest.approx(2 / 3)


@pytest.mark.parametrize("denominator", [0.0, -0.1])
def test_gap_ratios_refuse_a_non_positive_denominator(denominator):
    with pytest.raises(DiffImmuneError, match="positive similarity"):
        sgr(denominator, 0.1)
    with pytest.raises(DiffImmuneError, match="positive similarity"):
        mrsgr(0.1, denominator)
    with pytest.raises(DiffImmuneError, match="concept 'star'"):
        msgr({"star": (denominator, 0.1)})


def test_msgr_of_no_concepts_is_an_error():
    with pytest.raises(DiffImmuneError, match="at least one"):
        msgr({})
