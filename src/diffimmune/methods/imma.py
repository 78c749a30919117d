"""IMMA (Zheng & Yeh, "IMMA: Immunizing text-to-image Models against Malicious Adaptation", ECCV 2024).

One adversary (LoRA on the attention layers by default; DreamBooth, Textual Inversion or Custom
Diffusion on request) adapts to the target data; the released attention weights are updated to maximise
the diffusion loss of the *adapted* model on fresh target data. Several target concepts are pooled into
one adversary (that is MIMA's "Joint" baseline when the adversary is DreamBooth). With a list of adapters
there is one adversary of each kind, each scored on its own adapted model.
"""

from __future__ import annotations

from diffimmune.methods.bilevel import BilevelMethod, Branch


class IMMA(BilevelMethod):
    name = "imma"

    def make_branches(self) -> list[Branch]:
        concepts = list(range(len(self.context.concepts)))
        branches = []
        for name, lr in self.adapter_kinds():
            adapter = self.context.adapter(0, name)
            branches.append(Branch(adapter, concepts, adapter.base_names(self.model), lr, name))
        return branches

    def outer_params(self, theta, adapted):
        return adapted[0]

    def outer_views(self, theta, adapted):
        # Several kinds of adversary (a list-valued inner_method): each is scored on its own model.
        return super().outer_views(theta, adapted) if len(adapted) == 1 else self.own_views(adapted)
