"""MIMA (Zheng & Yeh, "Multi-concept Model Immunization through Differentiable Model Merging") and its
two baselines.

- **mima**: one DreamBooth adversary per target concept (with prior preservation), one lower-level step
  each; the N adapted models are merged (`core.merge.merge_models`: Custom Diffusion's closed form on
  every cross-attention K/V, the average elsewhere, or with `merge_others: sum` the base plus every
  adversary's change); the released cross-attention weights maximise the
  summed target loss *of the merged model*, differentiated through the merge (with `outer_models:
  merged_and_adapted`, plus each concept's loss on its own adversary's adapted model, unmerged; with
  `adapted`, only those: IMMA with one adversary per concept, the control that isolates the merge; there
  a list-valued `inner_method` gives every concept one adversary of each kind).
- **joint**: IMMA with a DreamBooth adversary on all concepts' data pooled.
- **compose**: only cross-attention K/V are adapted (one adversary per concept) and merged; everything
  else stays frozen.

The merge's constraints are the text embeddings at the positions of each concept's word (or
placeholder token) in its prompts, reduced to their `merge_directions` principal directions; its
regularisation embeddings are every token of `reg_prompts` captions of the retain data (on the world:
the other known shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffimmune.adapters.base import AdapterConfig, FullAdapter
from diffimmune.core.merge import merge_models, projection_operator
from diffimmune.errors import DiffImmuneError
from diffimmune.methods.bilevel import BilevelMethod, Branch
from diffimmune.methods.common import word_embeddings
from diffimmune.methods.imma import IMMA
from diffimmune.models.params import select_parameters


def principal_directions(rows: Tensor, count: int, tolerance: float = 1e-3) -> Tensor:
    """Up to `count` orthonormal rows spanning the dominant part of `rows`' row space, scaled by the
    mean row norm (so the merge's constraint sees embeddings of their usual size)."""
    _, singular, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    keep = int(min(count, int((singular > tolerance * singular[0]).sum())))
    scale = rows.double().norm(dim=1).mean()
    return (vh[:keep] * scale).to(rows.dtype)


def prompt_token_embeddings(model, prompts: list[str]) -> Tensor:
    """Every non-padding token's embedding (start and end tokens included) of `prompts`, stacked."""
    ids = model.tokenize(prompts)
    with torch.no_grad():
        embeddings = model.encode_prompts(prompts)
    pad = getattr(model.tokenizer, "pad_token_id", None)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    keep = torch.ones_like(ids, dtype=torch.bool)
    if pad is not None and pad != eos:
        keep = ids != pad
    else:  # CLIP pads with the end token: keep up to and including the first one
        first_end = (
            (ids == eos).int().argmax(dim=1) if eos is not None else torch.full((len(ids),), ids.shape[1] - 1)
        )
        keep = torch.arange(ids.shape[1], device=ids.device)[None] <= first_end[:, None]
    return embeddings[keep.to(embeddings.device)]


class MIMA(BilevelMethod):
    name = "mima"

    def __init__(self, context):
        self.kv_names = [n for n, t in select_parameters(context.model, "xattn_kv").items() if t.ndim == 2]
        super().__init__(context)
        model, config = self.model, self.config
        self.concept_rows = [
            principal_directions(word_embeddings(model, c.prompts, c.word), config.merge_directions)
            for c in context.concepts
        ]
        if context.retain is None:
            raise DiffImmuneError(
                "the merge needs regularisation prompts: set retain to a data string of concepts to keep"
            )
        self.reg_rows = prompt_token_embeddings(model, context.retain.prompts[: config.reg_prompts])
        total = sum(len(rows) for rows in self.concept_rows)
        features = self.reg_rows.shape[1]
        if total > features:
            raise DiffImmuneError(
                f"the merge has {total} constraint directions for {features} embedding features; "
                "lower merge_directions or immunize fewer concepts at once"
            )
        # The embeddings are constants, so the merge's solve is done once, not per K/V weight and step.
        self.merge_operator = projection_operator(torch.cat(self.concept_rows), self.reg_rows)

    def extra_base_names(self) -> list[str]:
        return self.kv_names

    def branch_adapter(self, index: int, name: str):
        return self.context.adapter(index, name)

    def make_branches(self) -> list[Branch]:
        """One adversary per concept, or with a list-valued inner_method one per concept and adapter."""
        kinds = self.adapter_kinds()
        branches = []
        for index, concept in enumerate(self.context.concepts):
            for name, lr in kinds:
                adapter = self.branch_adapter(index, name)
                label = concept.word if len(kinds) == 1 else f"{concept.word}_{name}"
                branches.append(Branch(adapter, [index], adapter.base_names(self.model), lr, label))
        return branches

    def outer_params(self, theta, adapted):
        released = {**self.frozen, **theta}
        names = list(adapted[0])
        kv = [n for n in self.kv_names if n in set(names)]
        base_names = names if self.config.merge_others == "sum" else kv
        merged = merge_models(
            {n: released[n] for n in base_names},
            adapted,
            self.concept_rows,
            self.reg_rows,
            set(kv),
            operator=self.merge_operator,
            others=self.config.merge_others,
        )
        return merged

    def outer_views(self, theta, adapted):
        own = self.own_views(adapted)
        if self.config.outer_models == "adapted":
            return own
        merged = [(params, scored, "merged") for params, scored, _ in super().outer_views(theta, adapted)]
        return merged + own if self.config.outer_models == "merged_and_adapted" else merged


class Joint(IMMA):
    """MIMA's Joint baseline: IMMA with a DreamBooth adversary on every concept's data pooled."""

    name = "joint"


class Compose(MIMA):
    """MIMA's Compose baseline: each adversary adapts only cross-attention K/V; K/V are merged."""

    name = "compose"

    def branch_adapter(self, index: int, name: str):
        return FullAdapter(AdapterConfig(selection="xattn_kv", seed=self.config.seed))
