"""Named parameter selections: which tensors an algorithm trains or edits.

Each selection is an exact pattern over the qualified parameter names of `DiffusionModel`
(`unet.<path>`, `text_encoder.<path>`), anchored at both ends and split at dots, so `attn2` never
matches `attn20` and `to_k` never matches `to_k_ip`.
"""

from __future__ import annotations

import re

from torch import Tensor

from diffimmune.errors import DiffImmuneError

_BLOCK = r"unet\.(?:[^.]+\.)*"
_PROJECTIONS = r"(?:to_q|to_k|to_v|to_out\.0)"

SELECTION_PATTERNS: dict[str, str] = {
    "xattn_kv": rf"{_BLOCK}attn2\.to_[kv]\.(?:weight|bias)",
    "xattn": rf"{_BLOCK}attn2\.{_PROJECTIONS}\.(?:weight|bias)",
    "attn": rf"{_BLOCK}attn[12]\.{_PROJECTIONS}\.(?:weight|bias)",
    "unet": r"unet\..+",
    "text_embeddings": r"text_encoder\.(?:text_model\.)?embeddings\.token_embedding\.weight",
    "text_encoder": r"text_encoder\..+",
}
# transformers 5 names CLIPTextModel tensors without the `text_model.` level that 4.x had.
# Selections defined as one minus another.
DIFFERENCES: dict[str, tuple[str, str]] = {
    "unet_minus_xattn_kv": ("unet", "xattn_kv"),
    "unet_minus_xattn": ("unet", "xattn"),  # ESD-u trains everything but cross-attention
}

SELECTIONS = tuple([*SELECTION_PATTERNS, *DIFFERENCES])


def selection_names(selection: str, names) -> list[str]:
    """The parameter names of `names` (in their order) that `selection` picks."""
    if selection in DIFFERENCES:
        keep, drop = DIFFERENCES[selection]
        dropped = set(selection_names(drop, names))
        return [n for n in selection_names(keep, names) if n not in dropped]
    if selection not in SELECTION_PATTERNS:
        raise DiffImmuneError(f"unknown parameter selection '{selection}'; known: {', '.join(SELECTIONS)}")
    pattern = re.compile(SELECTION_PATTERNS[selection])
    return [n for n in names if pattern.fullmatch(n)]


def select_parameters(model, selection: str) -> dict[str, Tensor]:
    """The model's own parameter tensors picked by `selection` (not copies), by qualified name."""
    named = model.named_parameters()
    chosen = selection_names(selection, list(named))
    if not chosen:
        raise DiffImmuneError(
            f"parameter selection '{selection}' matches nothing in {model.source}; "
            "is it a Stable-Diffusion-layout UNet with cross-attention?"
        )
    return {n: named[n] for n in chosen}


def trainable_parameters(model, selection: str) -> dict[str, Tensor]:
    """Select, and make exactly the selected tensors require gradients (everything else frozen)."""
    chosen = select_parameters(model, selection)
    for name, tensor in model.named_parameters().items():
        tensor.requires_grad_(name in chosen)
    return chosen
