"""What each kind of fine-tuning trains, as a pure function of the released weights.

An adapter turns the released parameters `base` (theta) into its own trainable state phi0(theta) and
back into the parameter dict the model is called with, `view(base, state)`. Attacks train `state` for
real through the training loop; immunization methods take differentiable inner steps on it, so a
hypergradient flows from the adapted model back to theta. Callers never branch on the adapter's type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from diffimmune.config import StrictModel
from diffimmune.errors import DiffImmuneError
from diffimmune.models.params import select_parameters


class AdapterConfig(StrictModel):
    """Settings shared by every adapter; each reads the ones it needs."""

    rank: int = Field(default=4, gt=0)
    alpha: float | None = Field(default=None, gt=0, description="LoRA scale numerator (default: rank)")
    lora_targets: str = "attn"
    selection: str | None = Field(default=None, description="what full / dreambooth train (default unet)")
    token: str = "sks"
    init_token: str | None = Field(default=None, description="word whose embedding starts a new token")
    seed: int = 0


def token_id(model, token: str) -> int:
    """The id of a single-token placeholder; it must exist in the tokenizer (the world's tokenizer
    has spare tokens `sks`, `<v1>`...; add others with `add_placeholder_token`)."""
    ids = model.tokenizer.convert_tokens_to_ids([token])
    unknown = getattr(model.tokenizer, "unk_token_id", None)
    if not ids or ids[0] is None or ids[0] == unknown:
        raise DiffImmuneError(
            f"token '{token}' is not in the tokenizer of {model.source}; use a spare token (sks, <v1>, ...) "
            "or add it with add_placeholder_token"
        )
    return int(ids[0])


def add_placeholder_token(model, token: str) -> int:
    """Add `token` to the tokenizer and grow the embedding table (for models without spare tokens)."""
    if token in model.tokenizer.get_vocab():
        return token_id(model, token)
    model.tokenizer.add_tokens([token])
    model.__dict__.pop("_token_cache", None)  # ids tokenized before the new token are stale
    model.text_encoder.resize_token_embeddings(len(model.tokenizer))
    model.text_encoder.requires_grad_(False)
    return token_id(model, token)


def embedding_name(model) -> str:
    (name,) = select_parameters(model, "text_embeddings")
    return name


def replace_row(table: Tensor, row: int, value: Tensor) -> Tensor:
    """`table` with one row replaced, out of place and differentiable in both."""
    mask = torch.zeros(table.shape[0], 1, dtype=torch.bool, device=table.device)
    mask[row] = True
    return torch.where(mask, value.unsqueeze(0).to(table.dtype), table)


class Adapter(ABC):
    """One kind of fine-tuning: which released tensors it reads, its state, and its view."""

    name: ClassVar[str]
    personalises: ClassVar[bool] = False  # teaches a new token

    def __init__(self, config: AdapterConfig | None = None):
        self.config = config or AdapterConfig()

    @abstractmethod
    def base_names(self, model) -> list[str]:
        """The released parameters whose values the view depends on."""

    def base_parameters(self, model) -> dict[str, Tensor]:
        named = model.named_parameters()
        return {n: named[n] for n in self.base_names(model)}

    @abstractmethod
    def init_state(self, model, base: dict[str, Tensor]) -> dict[str, Tensor]:
        """phi0(theta): differentiable in `base` where the adapter starts from the released weights."""

    def shifted_state(self, model, base: dict[str, Tensor], residual: dict[str, Tensor]) -> dict[str, Tensor]:
        """phi0(base) + residual, differentiable in both (how the bi-level methods store a lower level's
        state: as its offset from the start)."""
        start = self.init_state(model, base)
        return {k: start[k] + residual[k] for k in start}

    @abstractmethod
    def view(self, model, base: dict[str, Tensor], state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The parameter dict (qualified names) the adapted model is called with."""

    @torch.no_grad()
    def materialize(self, model, state: dict[str, Tensor]) -> None:
        """Write the adapted weights into the model itself."""
        base = self.base_parameters(model)
        model.load_parameters({n: v.detach() for n, v in self.view(model, base, state).items()})


class FullAdapter(Adapter):
    """Plain fine-tuning of a selection (the whole UNet by default): the state is a copy of it."""

    name = "full"

    def base_names(self, model) -> list[str]:
        return list(select_parameters(model, self.config.selection or "unet"))

    def init_state(self, model, base):
        return {n: t.clone() for n, t in base.items()}

    def shifted_state(self, model, base, residual):
        # phi0 is the base itself: no copy of it first (a pass over every tensor of the denoiser).
        return {n: t + residual[n] for n, t in base.items()}

    def view(self, model, base, state):
        return dict(state)


class DreamBoothAdapter(FullAdapter):
    """DreamBooth: full denoiser fine-tuning on a rare token; prior preservation lives in the batch."""

    name = "dreambooth"
    personalises = True


class TextualInversionAdapter(Adapter):
    """Textual Inversion: one new token's embedding row, nothing else."""

    name = "textual_inversion"
    personalises = True

    def base_names(self, model) -> list[str]:
        return [embedding_name(model)]

    def init_state(self, model, base):
        table = base[embedding_name(model)]
        start = (
            token_id(model, self.config.init_token)
            if self.config.init_token
            else token_id(model, self.config.token)
        )
        return {"token_embedding": table[start].clone()}

    def view(self, model, base, state):
        name = embedding_name(model)
        return {name: replace_row(base[name], token_id(model, self.config.token), state["token_embedding"])}


class CustomDiffusionAdapter(Adapter):
    """Custom Diffusion: cross-attention K/V plus a new token's embedding."""

    name = "custom_diffusion"
    personalises = True

    def __init__(self, config=None):
        super().__init__(config)
        self.token_part = TextualInversionAdapter(self.config)

    def base_names(self, model) -> list[str]:
        return [*select_parameters(model, "xattn_kv"), embedding_name(model)]

    def init_state(self, model, base):
        kv = {n: base[n].clone() for n in select_parameters(model, "xattn_kv")}
        return {**kv, **self.token_part.init_state(model, base)}

    def view(self, model, base, state):
        kv = {n: state[n] for n in select_parameters(model, "xattn_kv")}
        return {**kv, **self.token_part.view(model, base, state)}


class LoRAAdapter(Adapter):
    """LoRA: W + (alpha / rank) B A on every 2-D weight of `lora_targets` (attention by default).

    The low-rank update is merged into the weight inside the view, so the adapted model is called like
    any other parameter dict; `adapters.lora.export_diffusers_lora` writes the same A, B through peft in
    the format `pipeline.load_lora_weights` reads."""

    name = "lora"

    def base_names(self, model) -> list[str]:
        chosen = select_parameters(model, self.config.lora_targets)
        return [n for n, t in chosen.items() if t.ndim == 2]

    @property
    def scale(self) -> float:
        return (self.config.alpha or self.config.rank) / self.config.rank

    def init_state(self, model, base):
        generator = torch.Generator().manual_seed(self.config.seed)
        state = {}
        for name, weight in base.items():
            out_features, in_features = weight.shape
            # peft's "gaussian" initialisation: A ~ N(0, 1/rank), B = 0, so the adapted model starts at W.
            down = torch.randn(self.config.rank, in_features, generator=generator) / self.config.rank
            state[f"{name}.lora_A"] = down.to(weight.device, weight.dtype)
            state[f"{name}.lora_B"] = torch.zeros(
                out_features, self.config.rank, device=weight.device, dtype=weight.dtype
            )
        return state

    def view(self, model, base, state):
        return {n: w + self.scale * state[f"{n}.lora_B"] @ state[f"{n}.lora_A"] for n, w in base.items()}


ADAPTERS: dict[str, type[Adapter]] = {
    adapter.name: adapter
    for adapter in (
        LoRAAdapter,
        DreamBoothAdapter,
        TextualInversionAdapter,
        CustomDiffusionAdapter,
        FullAdapter,
    )
}


def make_adapter(name: str, config: AdapterConfig | None = None) -> Adapter:
    if name not in ADAPTERS:
        raise DiffImmuneError(f"unknown adapter '{name}'; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[name](config)


def attack_adapter(config) -> Adapter:
    """The adapter an `AttackConfig` trains (a real attack, or a fine-tune ResAlign simulates)."""
    return make_adapter(
        config.adapter_name,
        AdapterConfig(
            rank=config.rank,
            alpha=config.alpha,
            lora_targets=config.lora_targets,
            token=config.token,
            init_token=config.init_token,
            seed=config.seed,
        ),
    )
