"""Null-space projection of a released change: the change keeps the retain data's layer outputs.

`retain_projection` (an immunization option) confines the change of every trained linear and
convolution layer to the directions its inputs on the retain data do not use. For a layer with weight
W (out x d; a convolution's kernel flattened over its input patches) and bias b, the retain inputs x
(with a constant 1 appended when the bias is trained, so that W x + b is one product) have the
uncentred second moment C = E[x x^T]. Its leading eigenvectors U, enough to hold a share `energy` of
its trace, span what the retain data puts into the layer; the change Delta is kept to Delta (I - U U^T),
so Delta x ~ 0 for every retain input and the layer's output on the retain data does not move (exactly
in the span, to first order through the layers before it). The idea is that of gradient projection in
continual learning (Saha et al., GPM, ICLR 2021) and of null-space model editing (AlphaEdit, ICLR 2025):
a hard constraint on the whole retain distribution rather than a penalty on sampled retain batches.

Owns `RetainProjection` (the bases, projecting gradients and changes in place) and `retain_bases`
(the bases measured on a model with forward pre-hooks). Trained tensors of other layers (normalisation
scales, embeddings) stay at their starting values under the projection: they have no input to project
against. A bias trained without its weight is frozen too (it moves every retain output).

`retain_bases` can also keep, in full, the directions of given inputs to chosen layers: immunization uses
it to keep the prompt-fed layers (cross-attention K/V) fixed on the target words' token embeddings, where
an erasure such as UCE's acts, so that the change cannot undo the erasure it starts from through the words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerBasis", "RetainProjection", "retain_bases"]


@dataclass
class LayerBasis:
    """The retain inputs' leading directions for one layer: `basis` (d [+1] x k, orthonormal columns), or
    with `complement` the orthonormal directions left free (d [+1] x (d [+1] - k)), whichever is smaller."""

    weight: str  # the trained weight's name
    bias: str | None  # the trained bias's name, projected jointly with the weight (None: not trained)
    basis: Tensor
    dims: int  # d, or d + 1 with the bias column
    complement: bool = False

    @property
    def rank(self) -> int:
        """Directions kept fixed."""
        return self.dims - self.basis.shape[1] if self.complement else self.basis.shape[1]

    def project(self, rows: Tensor) -> Tensor:
        """rows (I - U U^T), as rows V V^T when the free directions V are stored."""
        basis = self.basis.to(rows.dtype)
        return (rows @ basis) @ basis.T if self.complement else rows - (rows @ basis) @ basis.T

    @classmethod
    def of(cls, weight: str, bias: str | None, kept: Tensor, dtype: torch.dtype) -> LayerBasis:
        """Store the kept directions `kept` (orthonormal columns) or, when they are over half, the rest."""
        dims, rank = kept.shape
        if rank <= dims - rank:
            return cls(weight, bias, kept.to(dtype), dims)
        full, _ = torch.linalg.qr(kept, mode="complete")
        return cls(weight, bias, full[:, rank:].contiguous().to(dtype), dims, complement=True)


class RetainProjection:
    """Projects changes of trained tensors onto the retain inputs' null space, layer by layer."""

    def __init__(self, layers: list[LayerBasis], frozen: list[str], passes: int = 1):
        self.layers = layers
        self.frozen = list(frozen)  # trained tensors the projection keeps at their starting values
        self.passes = passes  # retain passes the measurement took (one per group of layers)

    def summary(self) -> dict[str, float]:
        """What the constraint leaves free: layers, tensors frozen, and the mean share of free directions."""
        free = [1.0 - layer.rank / layer.dims for layer in self.layers]
        return {
            "layers": len(self.layers),
            "frozen": len(self.frozen),
            "free_share": sum(free) / max(1, len(free)),
            "passes": self.passes,
            "megabytes": sum(layer.basis.numel() * layer.basis.element_size() for layer in self.layers)
            / 2**20,
        }

    @torch.no_grad()
    def project_(self, changes: dict[str, Tensor]) -> None:
        """Replace each change in `changes` (keyed by tensor name; gradients or parameter differences)
        by its projection, in place. Names the projection does not know are left alone."""
        for name in self.frozen:
            if name in changes and changes[name] is not None:
                changes[name].zero_()
        for layer in self.layers:
            weight = changes.get(layer.weight)
            bias = changes.get(layer.bias) if layer.bias else None
            if weight is None and bias is None:
                continue
            # The basis spans [weight | bias] together; a part missing from `changes` (no gradient) is a
            # zero change, so the projection still sees the joint row it was measured for.
            present = weight if weight is not None else bias
            width = layer.dims - (1 if layer.bias else 0)
            rows = present.shape[0]
            columns = [present.new_zeros(rows, width) if weight is None else weight.reshape(rows, -1)]
            if layer.bias:
                columns.append(present.new_zeros(rows, 1) if bias is None else bias.reshape(-1, 1))
            joint = torch.cat(columns, 1) if len(columns) > 1 else columns[0]
            joint = layer.project(joint)
            if weight is not None:
                weight.copy_(joint[:, :width].reshape(weight.shape))
            if bias is not None:
                bias.copy_(joint[:, -1])

    def names(self) -> list[str]:
        """The tensors it covers: every layer's weight (and bias) and the frozen ones."""
        return [n for layer in self.layers for n in (layer.weight, layer.bias) if n] + self.frozen

    @torch.no_grad()
    def project_params_(self, params: dict[str, Tensor], reference: dict[str, Tensor]) -> None:
        """params <- reference + projection of (params - reference), for the tensors it covers."""
        changes = {n: params[n] - reference[n] for n in self.names() if n in params}
        self.project_(changes)
        for name, change in changes.items():
            params[name].copy_(reference[name] + change)


def _layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """The rows the layer multiplies its weight with: features (linear) or unfolded patches (conv)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _leading(moment: Tensor, energy: float) -> Tensor:
    """Orthonormal eigenvectors of a PSD matrix holding a share `energy` of its trace, largest first."""
    values, vectors = torch.linalg.eigh(moment)
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    total = float(values.sum())
    if total <= 0:
        return vectors[:, :0]
    kept = int(torch.searchsorted(torch.cumsum(values, 0) / total, torch.tensor(energy, dtype=values.dtype)))
    return vectors[:, : min(kept + 1, len(values))]


def _span(moment: Tensor, tolerance: float = 1e-10) -> Tensor:
    """Orthonormal eigenvectors of a PSD matrix spanning its whole range (eigenvalues above `tolerance`
    times the largest)."""
    values, vectors = torch.linalg.eigh(moment)
    top = float(values.max()) if len(values) else 0.0
    if top <= 0:
        return vectors[:, :0]
    return vectors[:, values > tolerance * top].flip(1)


def _union(first: Tensor, second: Tensor) -> Tensor:
    """An orthonormal basis of the span of two orthonormal column blocks."""
    joined = torch.cat([first, second], 1)
    if joined.shape[1] == 0:
        return joined
    left, singular, _ = torch.linalg.svd(joined, full_matrices=False)
    return left[:, singular > 1e-6]


def _accumulate(moments: dict[str, list], local: str, with_bias: bool, block: int = 8192):
    """A forward pre-hook adding a layer's input rows' second moment (float64, on the input's device) to
    `moments[local]`, `block` rows at a time (a large convolution's patches do not fit in float64 at once)."""

    def hook(module, args):
        rows = _layer_inputs(module, args[0].detach())
        entry = moments[local]
        for start in range(0, len(rows), block):
            part = rows[start : start + block].double()
            if with_bias:
                part = torch.cat([part, part.new_ones(len(part), 1)], 1)
            product = part.T @ part
            entry[0] = product if entry[0] is None else entry[0] + product
        entry[1] += len(rows)

    return hook


def _groups(sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Consecutive layers whose float64 moments (size^2 x 8 bytes) fit `budget` together; a layer over it
    alone is a group of its own."""
    groups: list[list[str]] = []
    used = budget + 1
    for name, size in sizes.items():
        need = size * size * 8
        if used + need > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    return groups


DEFAULT_MEMORY = 4 * 2**30  # bytes of float64 moments held at once while measuring


@torch.no_grad()
def retain_bases(
    module: nn.Module,
    prefix: str,
    trained: Iterable[str],
    run_retain: Callable[[], None],
    energy: float,
    kept: dict[str, Tensor] | None = None,
    memory_budget: int = DEFAULT_MEMORY,
) -> RetainProjection:
    """Measure the bases on `module` (its tensors named `prefix` + local name): `run_retain()` runs the
    module over the retain data (every call is accumulated). Layers whose weight or bias is among
    `trained` get a basis; other trained tensors are frozen. Groups other than one are not supported:
    such a convolution's tensors are frozen.

    `kept` maps local layer names to input rows [n, d] whose outputs the change must keep in full: every
    direction they span joins the layer's retain basis (its share `energy`), a trained bias's column too.

    The moments are float64 on the layers' device, d^2 x 8 bytes each (a convolution's d is its input
    channels x kernel area: up to 23,040 in SD's UNet, 4 GB). Layers are measured in groups whose moments
    fit `memory_budget`, `run_retain` once per group; each basis is stored in the weight's dtype, as its
    kept directions or, when those are over half, as the free ones."""
    trained = set(trained)
    layers: dict[str, tuple[str, str | None]] = {}
    modules: dict[str, nn.Module] = {}
    sizes: dict[str, int] = {}
    for local, child in module.named_modules():
        if not isinstance(child, nn.Linear | nn.Conv2d):
            continue
        if isinstance(child, nn.Conv2d) and child.groups != 1:
            continue
        weight = f"{prefix}{local}.weight"
        bias = f"{prefix}{local}.bias" if child.bias is not None else None
        if weight not in trained:
            continue  # a bias alone is frozen (below)
        bias_trained = bias is not None and bias in trained
        layers[local] = (weight, bias if bias_trained else None)
        modules[local] = child
        sizes[local] = child.weight[0].numel() + (1 if bias_trained else 0)
    bases = []
    # One retain pass per group of layers whose moments fit the memory budget (one pass on small models).
    groups = _groups(sizes, memory_budget)
    for group in groups:
        moments: dict[str, list] = {local: [None, 0] for local in group}
        handles = [
            modules[local].register_forward_pre_hook(
                _accumulate(moments, local, layers[local][1] is not None)
            )
            for local in group
        ]
        try:
            run_retain()
        finally:
            for handle in handles:
                handle.remove()
        for local in group:
            moment, count = moments.pop(local)
            if moment is None:  # the retain pass never reached the layer: it is frozen (below)
                continue
            weight, bias = layers[local]
            basis = _leading(moment / max(count, 1), energy)
            del moment
            if kept is not None and local in kept:
                rows = kept[local].detach().to(basis).reshape(-1, kept[local].shape[-1])
                if bias is not None:
                    rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1)
                basis = _union(basis, _span(rows.T @ rows))
            bases.append(LayerBasis.of(weight, bias, basis, modules[local].weight.dtype))
    reached = {n for layer in bases for n in (layer.weight, layer.bias) if n}
    frozen = sorted(n for n in trained if n not in reached and n.startswith(prefix))
    return RetainProjection(bases, frozen, passes=len(groups))
