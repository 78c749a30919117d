"""The differentiable merge of several adapted models into one (Custom Diffusion's closed form, MIMA's Merge).

Owns two pure functions of tensors and nothing else:

- `merge_projection`: the constrained least-squares update of one linear weight
  (Custom Diffusion, Kumari et al. 2023, eq. 5): change ``W0`` as little as possible on a set of
  regularisation embeddings while mapping the target-concept embeddings exactly to chosen outputs;
- `merge_models`: MIMA's Merge of N adapted parameter dicts: the closed form for cross-attention K/V
  weights with every concept's constraints stacked, a plain average for every other parameter.

Both are ordinary autograd graphs (``torch.linalg.solve``, no ``no_grad``, no in-place writes), so an
upper-level loss can backpropagate through the merge into the adapted weights, the base weights and the
embeddings. Written in the style of UCE's closed-form editor: one function of matrices, easy to test.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffimmune.errors import DiffImmuneError

__all__ = [
    "DEFAULT_RIDGE",
    "apply_projection",
    "merge_models",
    "merge_projection",
    "projection_operator",
    "regularisation_gram",
]

# Relative to the mean eigenvalue trace(M)/in of the regularisation Gram matrix M = C_reg^T C_reg.
# Needed when there are fewer regularisation embeddings than input features (m < in): M is then singular
# and the least-squares objective does not decide W outside the span of C_reg. The ridge picks, among the
# optimal W, the one closest to W0 in those directions; at 1e-4 of the mean eigenvalue it leaves the
# spanned directions essentially untouched and keeps M's condition number near 1e4, which float32 solves.
DEFAULT_RIDGE = 1e-4


def regularisation_gram(reg_embeddings: Tensor, ridge: float = DEFAULT_RIDGE) -> Tensor:
    """M = C_reg^T C_reg + ridge * (trace / in) * I, the (ridged) Gram matrix the merge inverts. [in, in]."""
    if ridge < 0:
        raise DiffImmuneError(f"merge ridge must be >= 0, got {ridge}")
    gram = reg_embeddings.transpose(0, 1) @ reg_embeddings
    features = gram.shape[0]
    # The scale is a constant of the problem, not a quantity to differentiate through.
    scale = (torch.diagonal(gram).sum() / features).detach().clamp_min(torch.finfo(gram.dtype).tiny)
    identity = torch.eye(features, dtype=gram.dtype, device=gram.device)
    return gram + (ridge * scale) * identity


def merge_projection(
    W0: Tensor,
    C: Tensor,
    V: Tensor,
    C_reg: Tensor,
    ridge: float = DEFAULT_RIDGE,
) -> Tensor:
    """The weight W closest to W0 on ``C_reg`` that maps every row of ``C`` exactly to the row of ``V``.

    Solves  min_W ||C_reg W^T - C_reg W0^T||_F^2  subject to  C W^T = V  in closed form:

        M = C_reg^T C_reg + ridge * trace(M)/in * I
        W^T = W0^T + M^{-1} C^T (C M^{-1} C^T)^{-1} (V - C W0^T)

    Args:
        W0: the base ``torch.nn.Linear`` weight, [out, in].
        C: the target-concept token embeddings, [n, in]; n <= in and C of full row rank.
        V: the outputs those embeddings must map to, [n, out].
        C_reg: the regularisation token embeddings, [m, in].
        ridge: the Tikhonov term, relative to the mean eigenvalue of C_reg^T C_reg (see DEFAULT_RIDGE).

    Returns the merged weight, [out, in], in W0's dtype, differentiable w.r.t. every tensor argument.
    """
    _check_projection_shapes(W0, C, V, C_reg)
    dtype, device = W0.dtype, W0.device
    C, V, C_reg = (t.to(dtype=dtype, device=device) for t in (C, V, C_reg))
    if C.shape[0] == 0:
        return W0
    return apply_projection(W0, C, V, projection_operator(C, C_reg, ridge))


def projection_operator(C: Tensor, C_reg: Tensor, ridge: float = DEFAULT_RIDGE) -> Tensor:
    """P = M^{-1} C^T (C M^{-1} C^T)^{-1}, [in, n]: the part of the merge that depends only on the
    embeddings. When they are constants (MIMA's are), P is computed once and every K/V weight of every
    step reuses it; it stays differentiable in C and C_reg when they are not."""
    # In float64 (then cast back): M's condition number reaches 1/ridge, and P is formed explicitly.
    wide = torch.promote_types(C.dtype, torch.float64)
    C64, reg64 = C.to(wide), C_reg.to(device=C.device, dtype=wide)
    gram = regularisation_gram(reg64, ridge)
    # A = M^{-1} C^T, then S = C A is the small [n, n] system; P = A S^{-1} by a right solve.
    m_inv_ct = torch.linalg.solve(gram, C64.transpose(0, 1))
    schur = C64 @ m_inv_ct
    return torch.linalg.solve(schur, m_inv_ct, left=False).to(C.dtype)


def apply_projection(W0: Tensor, C: Tensor, V: Tensor, operator: Tensor) -> Tensor:
    """W = W0 + (P (V - C W0^T))^T, with P from `projection_operator(C, C_reg)`."""
    residual = V.to(W0) - C.to(W0) @ W0.transpose(0, 1)
    return W0 + (operator.to(W0) @ residual).transpose(0, 1)


def merge_models(
    base: dict[str, Tensor],
    adapted: list[dict[str, Tensor]],
    concept_embeddings: list[Tensor],
    reg_embeddings: Tensor,
    kv_names: set[str],
    ridge: float = DEFAULT_RIDGE,
    operator: Tensor | None = None,
    others: str = "mean",
) -> dict[str, Tensor]:
    """MIMA's Merge: combine N adapted parameter dicts (one per target concept) into one.

    For every name in ``kv_names`` (cross-attention to_k / to_v weights, [out, in]) the result is
    ``merge_projection(base[name], C, V, reg_embeddings)`` with all concepts' constraints stacked:
    C = cat(C_i), V = cat(C_i @ adapted_i[name]^T), so each adapted model's K/V outputs on its own
    concept's tokens are kept exactly. Every other name is the plain average over the adapted models
    (``others="mean"``, the paper's Merge) or the base plus every adapted model's change from it
    (``others="sum"``, task arithmetic: each adapter's change enters at full strength, not 1/N of it).

    Args:
        base: the base parameters; must contain every name in ``kv_names``.
        adapted: one parameter dict per concept, all with the same names.
        concept_embeddings: one [n_i, in] tensor of token embeddings per concept, aligned with ``adapted``.
        reg_embeddings: [m, in] token embeddings of the regularisation prompts.
        kv_names: the parameter names merged by the closed form.
        ridge: passed to `merge_projection`.
        operator: `projection_operator(cat(concept_embeddings), reg_embeddings, ridge)`, computed once by
            a caller whose embeddings do not change (it is the same for every K/V weight).
        others: "mean" or "sum" (see above); "sum" needs every name in ``base``.

    Returns a dict with the adapted dicts' names, differentiable w.r.t. ``adapted``, ``base`` and the
    embeddings.
    """
    if not adapted:
        raise DiffImmuneError("merge_models needs at least one adapted parameter dict, got none")
    if len(concept_embeddings) != len(adapted):
        raise DiffImmuneError(
            f"merge_models got {len(adapted)} adapted dicts but {len(concept_embeddings)} concept "
            "embeddings: pass one embedding tensor per adapted model"
        )
    names = list(adapted[0])
    for index, params in enumerate(adapted[1:], start=1):
        if set(params) != set(names):
            different = sorted(set(params) ^ set(names))[:3]
            raise DiffImmuneError(
                f"adapted dict {index} has different parameter names from adapted dict 0 (e.g. {different})"
            )
    if others not in ("mean", "sum"):
        raise DiffImmuneError(f"merge_models others must be 'mean' or 'sum', got '{others}'")
    missing = sorted(name for name in kv_names if name not in adapted[0] or name not in base)
    if missing:
        raise DiffImmuneError(
            f"K/V names missing from the base or adapted parameters: {missing[:3]}; "
            "select the cross-attention to_k/to_v weights in both"
        )
    stacked_concepts = torch.cat(list(concept_embeddings), dim=0)
    merged: dict[str, Tensor] = {}
    for name in names:
        if name in kv_names:
            targets = [
                embeddings.to(params[name]) @ params[name].transpose(0, 1)
                for embeddings, params in zip(concept_embeddings, adapted, strict=True)
            ]
            outputs = torch.cat(targets, dim=0)
            _check_projection_shapes(base[name], stacked_concepts, outputs, reg_embeddings)
            if operator is None:  # the same for every K/V weight: computed for the first
                operator = projection_operator(
                    stacked_concepts.to(base[name]), reg_embeddings.to(base[name]), ridge
                )
            merged[name] = apply_projection(base[name], stacked_concepts, outputs, operator)
        elif others == "sum":
            if name not in base:
                raise DiffImmuneError(f"merge_models others='sum' needs the base value of '{name}'")
            changes = torch.stack([params[name] - base[name] for params in adapted])
            merged[name] = base[name] + changes.sum(dim=0)
        elif len(adapted) == 1:  # the average of one model is that model (no copy)
            merged[name] = adapted[0][name]
        else:
            merged[name] = torch.stack([params[name] for params in adapted]).mean(dim=0)
    return merged


def _check_projection_shapes(W0: Tensor, C: Tensor, V: Tensor, C_reg: Tensor) -> None:
    if W0.ndim != 2:
        raise DiffImmuneError(f"merge_projection needs a 2-D weight [out, in], got shape {tuple(W0.shape)}")
    out_features, in_features = W0.shape
    if C.ndim != 2 or C.shape[1] != in_features:
        raise DiffImmuneError(
            f"concept embeddings must be [n, {in_features}] to match the weight, got {tuple(C.shape)}"
        )
    if V.shape != (C.shape[0], out_features):
        raise DiffImmuneError(f"targets must be [{C.shape[0]}, {out_features}], got {tuple(V.shape)}")
    if C_reg.ndim != 2 or C_reg.shape[1] != in_features:
        raise DiffImmuneError(
            f"regularisation embeddings must be [m, {in_features}], got {tuple(C_reg.shape)}"
        )
    if C.shape[0] > in_features:
        raise DiffImmuneError(
            f"{C.shape[0]} concept constraints exceed the {in_features} input features: the merge is "
            "over-determined; use fewer concept tokens"
        )
