"""UCE (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024): erase concepts by a
closed-form edit of every cross-attention K and V projection.

For a projection W and concept embeddings c (the text embedding of a concept's last word), UCE solves

    min_W'  sum_erase e ||W' c_i - W g_i||^2 + sum_preserve p ||W' c_j - W c_j||^2 + lamb ||W' - W||_F^2

where g_i is the guide concept of c_i, so an erased concept's keys and values become the guide's and the
preserved ones stay. The solution (equation 7 of the paper) is one linear solve per projection:

    W' = (lamb W + e sum v_i c_i^T + p sum W c_j c_j^T) (lamb I + e sum c_i c_i^T + p sum c_j c_j^T)^-1
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from diffimmune.config import StrictModel
from diffimmune.errors import DiffImmuneError
from diffimmune.models.params import select_parameters


def uce_weight(
    weight: Tensor,
    erase_inputs: Tensor,
    erase_targets: Tensor,
    preserve_inputs: Tensor | None = None,
    lamb: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> Tensor:
    """The UCE edit of one projection `weight` [out, in], a pure function of matrices.

    erase_inputs [n, in] map to erase_targets [n, out]; preserve_inputs [m, in] keep their outputs
    under `weight`. Computed in float64 and returned in the weight's dtype."""
    if lamb <= 0:
        raise DiffImmuneError(f"UCE lamb must be positive (got {lamb}); it keeps the edit close to W")
    w = weight.double()
    c_erase, v_erase = erase_inputs.double(), erase_targets.double()
    left = lamb * w + erase_scale * v_erase.T @ c_erase
    right = (
        lamb * torch.eye(w.shape[1], dtype=torch.float64, device=w.device) + erase_scale * c_erase.T @ c_erase
    )
    if preserve_inputs is not None and len(preserve_inputs):
        c_keep = preserve_inputs.double()
        left = left + preserve_scale * (c_keep @ w.T).T @ c_keep
        right = right + preserve_scale * c_keep.T @ c_keep
    # W' right = left  <=>  right^T W'^T = left^T (right is symmetric).
    return torch.linalg.solve(right, left.T).T.to(weight.dtype)


def concept_embeddings(model, concepts: Sequence[str]) -> Tensor:
    """The text embedding of each concept's last token (before the end token), as the official code takes."""
    if not concepts:
        return torch.empty(0, model.text_encoder.config.hidden_size)
    tokens = model.tokenizer(
        list(concepts),
        padding="max_length",
        max_length=model.max_prompt_length,
        truncation=True,
        return_tensors="pt",
    )
    last = tokens.attention_mask.sum(1) - 2
    with torch.no_grad():
        embeddings = model.encode_prompts(list(concepts))
    return embeddings[torch.arange(len(concepts)), last.to(embeddings.device)]


def uce_erase(
    model,
    erase: Sequence[str],
    guide: Sequence[str] | str = "",
    preserve: Sequence[str] = (),
    lamb: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> dict[str, Tensor]:
    """New values for every cross-attention K/V weight that erase `erase` towards `guide` (one guide
    for all, or one per concept) and preserve `preserve`. The model itself is not changed."""
    guides = [guide] * len(erase) if isinstance(guide, str) else list(guide)
    if len(guides) != len(erase):
        raise DiffImmuneError(
            f"UCE got {len(erase)} concepts to erase but {len(guides)} guides; give one, or one each"
        )
    if not erase:
        raise DiffImmuneError("UCE needs at least one concept to erase")
    erase_inputs = concept_embeddings(model, erase)
    guide_inputs = concept_embeddings(model, guides)
    preserve_inputs = concept_embeddings(model, list(preserve))
    edited = {}
    for name, weight in select_parameters(model, "xattn_kv").items():
        if weight.ndim != 2:
            continue
        with torch.no_grad():
            edited[name] = uce_weight(
                weight,
                erase_inputs,
                guide_inputs @ weight.T,
                preserve_inputs,
                lamb,
                erase_scale,
                preserve_scale,
            )
    return edited


class UCEConfig(StrictModel):
    """One UCE erasure, as `diffimmune erase --method uce` and an experiment's `erase:` section take it."""

    concepts: list[str] = Field(min_length=1, description="words to erase (world: shape names)")
    guide: list[str] = Field(default=[""], description="one guide for all, or one per concept")
    preserve: list[str] = Field(default=[], description="words whose keys and values must stay")
    lamb: float = Field(default=0.5, gt=0)
    erase_scale: float = Field(default=1.0, ge=0)
    preserve_scale: float = Field(default=1.0, ge=0)


def erase_with_uce(model, config: UCEConfig, out_dir) -> dict[str, Tensor]:
    """Apply the UCE edit to `model` (its weights change) and write the delta to `out_dir`."""
    guides = config.guide[0] if len(config.guide) == 1 else config.guide
    edited = uce_erase(
        model,
        config.concepts,
        guides,
        config.preserve,
        lamb=config.lamb,
        erase_scale=config.erase_scale,
        preserve_scale=config.preserve_scale,
    )
    reference = model.snapshot(edited)
    model.load_parameters(edited)
    model.save_delta(
        out_dir, reference, method="uce", selection="xattn_kv", hyperparameters=config.model_dump(mode="json")
    )
    return edited
