"""The multi-bandwidth RBF MMD used by GIFT's representation noising."""

import pytest
import torch

from diffimmune.core.mmd import mmd_rbf
from diffimmune.errors import DiffImmuneError


def _samples(shift=0.0, n=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 2, 2, generator=generator, dtype=torch.float64) + shift


def test_is_near_zero_for_two_samples_of_one_distribution_and_far_from_it_for_a_shifted_one():
    same = mmd_rbf(_samples(seed=0), _samples(seed=1))
    shifted = mmd_rbf(_samples(seed=0), _samples(shift=1.0, seed=1))
    assert same < 0.01
    assert shifted > 10 * same


def test_unbiased_estimator_is_near_zero_already_for_small_samples():
    same = mmd_rbf(_samples(n=64, seed=0), _samples(n=64, seed=1), unbiased=True)
    shifted = mmd_rbf(_samples(n=64, seed=0), _samples(shift=1.0, n=64, seed=1), unbiased=True)
    assert abs(same) < 0.005
    assert shifted > 20 * abs(same)


def test_grows_monotonically_with_a_mean_shift():
    reference = _samples(seed=0)
    values = [mmd_rbf(reference, _samples(shift=shift, seed=1)).item() for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values) and values[0] < values[-1]


def test_is_symmetric():
    x, y = _samples(seed=0), _samples(shift=0.7, n=40, seed=1)
    assert torch.allclose(mmd_rbf(x, y), mmd_rbf(y, x))
    assert torch.allclose(mmd_rbf(x, y, unbiased=True), mmd_rbf(y, x, unbiased=True))


def test_biased_estimator_is_non_negative_also_for_identical_samples():
    x = _samples(seed=0)
    assert mmd_rbf(x, x) >= 0
    assert all(mmd_rbf(_samples(seed=seed), _samples(seed=seed + 1)) >= 0 for seed in range(5))


def test_absolute_bandwidths_also_separate_shifted_samples():
    x = _samples(seed=0)
    same = mmd_rbf(x, _samples(seed=1), bandwidths=(2.0, 4.0), relative_to_median=False)
    shifted = mmd_rbf(x, _samples(shift=1.0, seed=1), bandwidths=(2.0, 4.0), relative_to_median=False)
    assert shifted > 10 * same


def test_is_differentiable_and_its_gradient_moves_samples_together():
    x = _samples(shift=1.0, seed=0).requires_grad_(True)
    y = _samples(seed=1)
    loss = mmd_rbf(x, y)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()
    assert mmd_rbf(x.detach() - 0.5 * grad / grad.norm(), y) < loss


def test_rejects_samples_of_different_sizes():
    with pytest.raises(DiffImmuneError, match="features"):
        mmd_rbf(torch.randn(4, 3), torch.randn(4, 5))


def test_rejects_non_positive_bandwidths():
    with pytest.raises(DiffImmuneError, match="bandwidths"):
        mmd_rbf(torch.randn(4, 3), torch.randn(4, 3), bandwidths=(1.0, 0.0))
