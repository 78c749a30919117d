"""The maximum mean discrepancy between two samples, used by GIFT's representation noising.

Owns `mmd_rbf`: a differentiable MMD^2 with a sum of RBF kernels at several bandwidths, so an
upper-level loss can push intermediate activations on target data towards Gaussian noise without
choosing one length scale by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffimmune.errors import DiffImmuneError

__all__ = ["DEFAULT_BANDWIDTHS", "mmd_rbf"]

# Multipliers of the median pairwise distance: one octave apart, wide enough to see both local and
# global mismatch (the usual multi-kernel choice of Gretton et al. 2012 and of GIFT).
DEFAULT_BANDWIDTHS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def mmd_rbf(
    x: Tensor,
    y: Tensor,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    relative_to_median: bool = True,
    unbiased: bool = False,
) -> Tensor:
    """MMD^2 between samples ``x`` [n, ...] and ``y`` [m, ...] under k(a, b) = mean_s exp(-||a-b||^2 / 2 s^2).

    Trailing dimensions are flattened, so activations [n, C, H, W] compare as vectors.

    Args:
        bandwidths: the kernel widths s; with ``relative_to_median`` they multiply the median pairwise
            distance of the pooled sample, otherwise they are absolute.
        relative_to_median: scale the widths to the data (the median heuristic).
        unbiased: drop the diagonal terms (the U-statistic, which can be negative); the default biased
            V-statistic is the squared RKHS distance of the two mean embeddings, so it is >= 0.

    Returns a scalar tensor in [0, 2] (biased), differentiable w.r.t. ``x`` and ``y``.
    """
    x, y = _flatten_samples(x, y, unbiased)
    widths = torch.as_tensor(list(bandwidths), dtype=x.dtype, device=x.device)
    if widths.numel() == 0 or not bool((widths > 0).all()):
        raise DiffImmuneError(
            f"mmd bandwidths must be a non-empty list of positive numbers, got {bandwidths}"
        )
    n = x.shape[0]
    pooled = torch.cat([x, y], dim=0)
    # Centring leaves distances unchanged but avoids cancellation in ||a||^2 + ||b||^2 - 2ab for
    # activations with a large common offset; the matmul form never builds [n, m, d].
    pooled = pooled - pooled.mean(dim=0, keepdim=True)
    sq_norms = pooled.pow(2).sum(dim=1)
    sq_dists = (sq_norms[:, None] + sq_norms[None, :] - 2 * pooled @ pooled.transpose(0, 1)).clamp_min(0)

    if relative_to_median:
        off_diagonal = ~torch.eye(pooled.shape[0], dtype=torch.bool, device=pooled.device)
        # The length scale is a property of the data, not something the loss should move: detached, so
        # the gradient cannot shrink the MMD by inflating the median instead of matching the samples.
        median = sq_dists.detach()[off_diagonal].median().clamp_min(torch.finfo(x.dtype).eps)
        variances = widths.pow(2) * median
    else:
        variances = widths.pow(2)
    kernel = torch.exp(-sq_dists[None] / (2 * variances[:, None, None])).mean(dim=0)

    k_xx, k_yy, k_xy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    if unbiased:
        m = y.shape[0]
        term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
        term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        return term_xx + term_yy - 2 * k_xy.mean()
    return (k_xx.mean() + k_yy.mean() - 2 * k_xy.mean()).clamp_min(0)


def _flatten_samples(x: Tensor, y: Tensor, unbiased: bool) -> tuple[Tensor, Tensor]:
    if x.ndim == 0 or y.ndim == 0:
        raise DiffImmuneError("mmd samples must have a leading sample dimension, got a scalar")
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1).to(x)
    if x.shape[1] != y.shape[1]:
        raise DiffImmuneError(f"mmd samples differ in size per item: {x.shape[1]} vs {y.shape[1]} features")
    minimum = 2 if unbiased else 1
    if x.shape[0] < minimum or y.shape[0] < minimum:
        raise DiffImmuneError(
            f"mmd needs at least {minimum} items per sample, got {x.shape[0]} and {y.shape[0]}"
        )
    return x, y
