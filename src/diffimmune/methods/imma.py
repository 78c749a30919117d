"""IMMA (Zheng & Yeh, "IMMA: Immunizing text-to-image Models against Malicious Adaptation", ECCV 2024).

One adversary (LoRA on the attention layers by default; DreamBooth, Textual Inversion or Custom
Diffusion on request) adapts to the target data; the released attention weights are updated to maximise
the diffusion loss of the *adapted* model on fresh target data. Several target concepts are pooled into
one adversary (that is MIMA's "Joint" baseline when the adversary is DreamBooth).
"""

from __future__ import annotations

from diffimmune.methods.bilevel import BilevelMethod, Branch


class IMMA(BilevelMethod):
    name = "imma"

    def make_branches(self) -> list[Branch]:
        adapter = self.context.adapter(0)
        return [Branch(adapter, list(range(len(self.context.concepts))), adapter.base_names(self.model))]

    def outer_params(self, theta, adapted):
        return adapted[0]
