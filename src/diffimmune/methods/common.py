"""What every trained immunizer shares: its validated config, its concept data, its run folder.

Layout of an immunization run folder (`diffimmune immunize --out RUN`):

    immunize.json            the validated ImmunizeConfig and the model it was given
    train/                   the training loop's checkpoints and metrics.jsonl (resume)
    class_images.safetensors prior-preservation images (methods with a DreamBooth lower level)
    delta/                   the result: changed tensors + manifest (load RUN or RUN/delta as a model)

A method is a small class (see `Method`): the released tensors it trains, any lower-level state it
carries between outer steps (kept in the training loop's checkpoints, so a resumed run ends bitwise
equal), and one outer step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, PositiveFloat, model_validator
from torch import Tensor

from diffimmune.adapters.base import AdapterConfig, make_adapter
from diffimmune.attacks.presets import WORLD_ATTACK_SETTINGS
from diffimmune.config import StrictModel, TrainConfig, load_config
from diffimmune.core.objective import Batch, esd_target, guided, noisy_inputs
from diffimmune.data.sources import load_concept_data, parse_filter
from diffimmune.errors import DiffImmuneError
from diffimmune.files import ensure_writable_folder, replace_other_run, write_json_atomic
from diffimmune.models.diffusion_model import RUN_DELTA
from diffimmune.models.params import SELECTIONS, select_parameters, selection_names

if TYPE_CHECKING:
    from diffimmune.core.projection import RetainProjection

IMMUNIZE_METHODS = ("imma", "mima", "joint", "compose", "esd", "gift", "resalign")
InnerMethod = Literal["lora", "dreambooth", "textual_inversion", "custom_diffusion", "full"]  # the adapters
INNER_PREFIX = "inner."
# `average_from`: the running mean of the released tensors, and how many iterates it holds, in the
# training state (so the checkpoints carry it and a resumed run ends where the unbroken one does).
AVERAGE_PREFIX = "average."
AVERAGE_COUNT = "average_count"
BILEVEL_METHODS = ("imma", "mima", "joint", "compose")  # methods/bilevel.py: adapters as the lower level

# Method-specific fields and the methods that read them. A config giving any other method a value other
# than the field's default is refused, rather than run with the field silently ignored.
_RESALIGN_FIELDS = (
    "relearn_weight",
    "harmful_loss",
    "resalign_rank",
    "proximal_gamma",
    "richardson_steps",
    "richardson_damping",
    "finetune_samples",
    "finetune_methods",
    "finetune_learning_rates",
    "finetune_sgd_lr_scale",
    "finetune_steps",
    "finetune_optimizers",
    "finetune_data",
)
FIELD_READERS: dict[str, tuple[str, ...]] = {
    "inner_method": BILEVEL_METHODS,
    "inner_optimizer": BILEVEL_METHODS,
    "inner_warm_start": BILEVEL_METHODS,
    "inner_learning_rate": (*BILEVEL_METHODS, "gift"),  # GIFT: its preservation step
    "inner_steps": (*BILEVEL_METHODS, "gift"),
    "inner_catch_up": BILEVEL_METHODS,
    "inner_restart": BILEVEL_METHODS,
    # the methods whose trained tensors are the released ones (ResAlign trains a LoRA merged at the end)
    "average_from": (*BILEVEL_METHODS, "gift", "esd"),
    "max_loss": (*BILEVEL_METHODS, "gift", "resalign"),
    "retain_loss": (*BILEVEL_METHODS, "gift", "resalign"),  # ResAlign always distils; guided changes how
    "retain_rollout_steps": BILEVEL_METHODS,
    "merge_directions": ("mima", "compose"),
    "merge_others": ("mima", "compose"),
    "outer_models": ("mima", "compose"),
    "esd_variant": ("esd",),
    # ResAlign: harmful_loss esd; GIFT, ResAlign and the bi-level methods: the anchor's eta
    "negative_guidance": ("esd", "resalign", "gift", *BILEVEL_METHODS),
    "beta": ("gift",),
    "noise_layers": ("gift",),
    "mmd_bandwidths": ("gift",),
    "anchor_weight": (*BILEVEL_METHODS, "gift", "resalign"),
    "anchor_refresh": (*BILEVEL_METHODS, "gift", "resalign"),
    "anchor_selection": (*BILEVEL_METHODS, "gift", "resalign"),
    "anchor_reference": (*BILEVEL_METHODS, "gift", "resalign"),
    **dict.fromkeys(_RESALIGN_FIELDS, ("resalign",)),
}

# Per method: the upper-level selection, the lower-level adapter and whether it uses prior preservation,
# as the official scripts set them (IMMA: attention + LoRA; MIMA: cross-attention + DreamBooth).
METHOD_DEFAULTS: dict[str, dict] = {
    "imma": {"selection": "attn", "inner_method": "lora", "prior_preservation": False},
    "mima": {"selection": "xattn", "inner_method": "dreambooth", "prior_preservation": True},
    "joint": {"selection": "xattn", "inner_method": "dreambooth", "prior_preservation": True},
    # Compose's adversaries are Custom Diffusion's K/V part (no token); the name sets their step size.
    "compose": {"selection": "xattn_kv", "inner_method": "custom_diffusion", "prior_preservation": False},
    "esd": {"selection": None, "inner_method": None, "prior_preservation": False},  # by esd_variant
    # GIFT's lower level preserves safe data with the ordinary diffusion loss (no adapter).
    "gift": {"selection": "xattn", "inner_method": None, "prior_preservation": False},
    # ResAlign trains a LoRA on the attention layers (merged at the end); its fine-tunes are sampled.
    "resalign": {"selection": "attn", "inner_method": None, "prior_preservation": False},
}


# ESD-x trains the cross-attention, ESD-u everything else.
ESD_SELECTIONS = {"x": "xattn", "u": "unet_minus_xattn"}

# The lower level's SGD step size per adapter, calibrated on the world model: the size at which 20 steps
# lower the target loss clearly without diverging (a larger one diverges for DreamBooth).
INNER_LR: dict[str, float] = {
    "lora": 1.0,
    "dreambooth": 1e-2,
    "full": 1e-2,
    "custom_diffusion": 0.3,
    "textual_inversion": 1.0,
}


# ImmunizeConfig fields added after runs were made, with the value those runs had (pipeline stage hashes
# and resumed run folders read a missing field as this value).
IMMUNIZE_FIELDS_ADDED = {
    "retain_loss": "diffusion",
    "retain_unconditional": False,
    "merge_others": "mean",
    "outer_models": "merged",
    "retain_sampling": "uniform",
    "retain_refresh": 50,
    "retain_states": "noised",
    "retain_sampler_steps": 25,
    "retain_guidance_scale": 4.0,
    "inner_optimizer": "sgd",
    "retain_rollout_steps": 3,
    "retain_projection": None,
    "retain_projection_samples": 256,
    "retain_projection_target_words": False,
    "inner_catch_up": 0,
    "inner_restart": 0,
    "average_from": None,
    "anchor_weight": 0.0,
    "anchor_refresh": 0,
    "anchor_selection": None,
    "anchor_reference": None,
}


class ImmunizeConfig(StrictModel):
    """One immunization (or trained erasure). Unset fields take the method's defaults (METHOD_DEFAULTS)."""

    method: Literal["imma", "mima", "joint", "compose", "esd", "gift", "resalign"]
    concepts: list[str] = Field(
        min_length=1, description="one data string per target concept: world:shape=star, FOLDER::shape=x"
    )
    prompt: str | None = Field(default=None, description="template with {token}/labels; None: captions")
    tokens: list[str] | None = Field(default=None, description="one placeholder token per concept")
    steps: int = Field(default=200, gt=0)
    learning_rate: float = Field(default=3e-4, gt=0, description="upper-level (released weights) lr")
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    grad_clip: float | None = Field(default=1.0, gt=0)
    batch_size: int = Field(default=4, gt=0)
    num_images: int = Field(default=20, gt=0, description="images per target concept")
    selection: str | None = Field(default=None, description="released tensors trained (method default)")
    hypergradient: Literal["first_order", "unrolled", "implicit"] = Field(
        default="unrolled", description="implicit: ResAlign's only (its default); it also takes first_order"
    )
    inner_method: InnerMethod | list[InnerMethod] | None = Field(
        default=None,
        description="the lower level's adapter (method default); a list puts one adversary of each kind "
        "in every branch (IMMA/Joint: one per kind; MIMA: one per concept and kind, with outer_models "
        "adapted), each scored on its own adapted model",
    )
    inner_optimizer: Literal["sgd", "adam"] = Field(
        default="sgd",
        description="bi-level methods' lower-level step: SGD (the papers), or Adam with bias correction, "
        "the attacks' optimiser (its moments are carried between outer steps with inner_warm_start)",
    )
    inner_learning_rate: PositiveFloat | list[PositiveFloat] | None = Field(
        default=None,
        description="lower-level step size (default per adapter: INNER_LR for SGD, the world attack's "
        "learning rate for Adam); with a list of inner_method, one per adapter or one for all",
    )
    inner_steps: int = Field(default=1, gt=0, description="lower-level steps per outer step")
    inner_catch_up: int = Field(
        default=0,
        ge=0,
        description="bi-level methods, with max_loss: up to this many extra lower-level steps (no graph) "
        "before an outer step's own, until one starts with every adversary's loss on its target data within "
        "max_loss (that step kept, so at least one), so the ascent keeps a recovered adversary to push against",
    )
    inner_restart: int = Field(
        default=0,
        ge=0,
        description="bi-level methods, with inner_warm_start: every this many outer steps the carried adversaries "
        "start again from the released weights (residuals and Adam moments zeroed), so the ascent keeps meeting "
        "young adversaries, as a fresh attack starts, beside grown ones (0: never)",
    )
    inner_rank: int = Field(default=4, gt=0)
    inner_warm_start: bool = Field(
        default=True, description="the lower level keeps adapting across outer steps (official code)"
    )
    prior_preservation: bool | None = None
    class_prompt: str | None = "a photo of a shape"
    num_class_images: int = Field(default=20, gt=0)
    prior_weight: float = Field(default=1.0, ge=0)
    retain: str | None = Field(
        default=None, description="data the model must keep (default on the world: every other known shape)"
    )
    retain_weight: float = Field(default=0.0, ge=0, description="weight of the retain loss (0: off)")
    retain_loss: Literal["diffusion", "distill", "guided", "rollout"] = Field(
        default="diffusion",
        description="bi-level methods' retain loss and GIFT's preservation step: the diffusion loss on the "
        "retain data, distillation of the starting model's predictions on them (ResAlign always distils), "
        "guided: distillation of the classifier-free-guided prediction uncond + s (cond - uncond) at "
        "s = retain_guidance_scale, the prediction the sampler steps with, or rollout (bi-level methods, "
        "with retain_states sampler): retain_rollout_steps guided sampler steps under the trained weights "
        "from a state of the starting model's trajectory, against where that trajectory went",
    )
    retain_unconditional: bool = Field(
        default=False,
        description="the retain loss also keeps the retain images' unconditional (empty-prompt) "
        "predictions, which classifier-free guidance amplifies at sampling",
    )
    retain_sampling: Literal["uniform", "hard"] = Field(
        default="uniform",
        description="how retain batches are drawn: uniformly, or hard: half uniformly and half in "
        "proportion to how far each retain image's predictions have drifted from the starting model's",
    )
    retain_refresh: int = Field(
        default=50, gt=0, description="hard retain sampling: steps between re-measurements of the drift"
    )
    retain_states: Literal["noised", "sampler"] = Field(
        default="noised",
        description="where the retain loss reads the denoiser: the retain images noised at random "
        "timesteps, or the states the starting model's own guided sampler visits for the retain prompts "
        "(every step of one trajectory per prompt), where the drift that moves generations builds up",
    )
    retain_sampler_steps: int = Field(
        default=25, gt=0, description="retain_states sampler: DDIM steps of the recorded trajectories"
    )
    retain_rollout_steps: int = Field(
        default=3, gt=0, description="retain_loss rollout: sampler steps taken from each recorded state"
    )
    retain_guidance_scale: float = Field(
        default=4.0,
        ge=1.0,
        description="classifier-free guidance of the retain_states sampler's trajectories and of retain_loss "
        "guided (default: the evaluation's)",
    )
    retain_projection: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="keep the released change of every trained linear and convolution layer out of the "
        "directions its inputs take on the retain data (core/projection.py): the share of their energy "
        "kept fixed, e.g. 0.99 (None: off); other trained tensors stay frozen under it (ResAlign: its LoRA's "
        "A factors stay in the free directions, so the merged change does)",
    )
    retain_projection_samples: int = Field(
        default=256, gt=0, description="retain_projection: retain samples its bases are measured on"
    )
    retain_projection_target_words: bool = Field(
        default=False,
        description="retain_projection: the prompt-fed layers (cross-attention K/V) also keep their outputs "
        "on the target words' token embeddings in their prompts, in full (where UCE's erasure acts), so the "
        "change cannot undo the erasure it starts from through the words themselves",
    )
    reg_prompts: int = Field(default=200, gt=0, description="regularisation prompts of the merge")
    merge_directions: int = Field(default=3, gt=0, description="constraint directions per concept")
    merge_others: Literal["mean", "sum"] = Field(
        default="mean",
        description="MIMA's merge outside cross-attention K/V: the average of the adapted models (the "
        "paper) or the released weights plus every adversary's change (each at full strength)",
    )
    outer_models: Literal["merged", "merged_and_adapted", "adapted"] = Field(
        default="merged",
        description="MIMA and Compose: the models whose target loss the upper level maximises: the merged "
        "model (the paper); also each adversary's own adapted model on its concept (merged_and_adapted: an "
        "attacker who fine-tunes one concept and does not merge); or only those (adapted: IMMA with one "
        "adversary per concept, the control that isolates the merge)",
    )
    max_loss: float | None = Field(
        default=None, gt=0, description="stop ascending a concept's loss once it exceeds this"
    )
    negative_guidance: float = Field(
        default=1.0,
        ge=0,
        description="ESD's eta (also ResAlign's harmful_loss esd and the anchor's, anchor_weight)",
    )
    esd_variant: Literal["x", "u"] = "x"
    # GIFT (methods/gift.py)
    beta: float = Field(
        default=1.0, ge=0, description="GIFT: weight of representation noising (MMD to noise); 0 turns it off"
    )
    anchor_weight: float = Field(
        default=0.0,
        ge=0,
        description="GIFT, ResAlign, the bi-level methods: weight of ESD's erasure loss at the states the "
        "starting model's sampler visits for the target prompts: the target prompt's prediction is pulled "
        "to the starting model's prediction there guided away from the target (by negative_guidance); 0: off",
    )
    anchor_refresh: int = Field(
        default=0,
        ge=0,
        description="GIFT, ResAlign, the bi-level methods: every this many steps, re-record the anchor's "
        "states from the model being trained (fresh noise each time), as ESD samples them; 0: keep the "
        "starting model's states",
    )
    anchor_selection: str | None = Field(
        default=None,
        description="GIFT, ResAlign, the bi-level methods: the trained tensors the anchor's gradient reaches "
        "(a parameter selection such as xattn, ESD-x's); unset: every trained tensor",
    )
    anchor_reference: str | None = Field(
        default=None,
        description="GIFT, ResAlign, the bi-level methods: the model whose predictions make the anchor's "
        "erasure target (a diffusers folder, hub id or delta; in an experiment file, base: the experiment's "
        "model); unset: the model being immunized, as ESD. Point it at the model before an erasure when "
        "immunizing an erased one: the erased model's own guidance no longer points at the concept",
    )
    noise_layers: list[str] = Field(
        default_factory=lambda: ["down_blocks.*", "mid_block", "up_blocks.*"],
        min_length=1,
        description="GIFT: denoiser module-name patterns (core.hooks globs) whose outputs are noised",
    )
    mmd_bandwidths: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0],  # core.mmd.DEFAULT_BANDWIDTHS
        min_length=1,
        description="GIFT: RBF kernel widths of the MMD, as multiples of the median pairwise distance",
    )

    @model_validator(mode="after")
    def _gift_fields(self):
        if not all(width > 0 and width != float("inf") for width in self.mmd_bandwidths):
            raise ValueError(f"mmd_bandwidths must be positive finite numbers, got {self.mmd_bandwidths}")
        if any(not pattern.strip() for pattern in self.noise_layers):
            raise ValueError("noise_layers has an empty pattern; give module names such as mid_block")
        if (
            self.method in ("gift", *BILEVEL_METHODS)
            and self.anchor_weight == 0
            and self.negative_guidance != 1.0
        ):
            raise ValueError(
                f"negative_guidance is {self.method}'s anchor eta and the anchor is off: set anchor_weight"
            )
        if self.anchor_weight == 0 and self.anchor_refresh:
            raise ValueError("anchor_refresh re-records the anchor and the anchor is off: set anchor_weight")
        if self.anchor_weight == 0 and self.anchor_selection is not None:
            raise ValueError("anchor_selection limits the anchor and the anchor is off: set anchor_weight")
        if self.anchor_weight == 0 and self.anchor_reference is not None:
            raise ValueError(
                "anchor_reference makes the anchor's target and the anchor is off: set anchor_weight"
            )
        if self.anchor_selection is not None and self.anchor_selection not in SELECTIONS:
            raise ValueError(
                f"anchor_selection '{self.anchor_selection}' is not a parameter selection; "
                f"known: {', '.join(SELECTIONS)}"
            )
        return self

    # ResAlign (methods/resalign.py)
    relearn_weight: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="ResAlign: lambda, weight of the harm after a fine-tune (0: unlearning)",
    )
    harmful_loss: Literal["diffusion", "esd"] = Field(
        default="diffusion", description="ResAlign: negated diffusion loss on target data, or ESD's loss"
    )
    resalign_rank: int = Field(default=4, gt=0, description="ResAlign: rank of the trained (merged) LoRA")
    proximal_gamma: float = Field(
        # Calibrated on the world model: full fine-tunes' Hessian needs gamma * lambda_max of a few at most.
        default=0.05,
        gt=0,
        description="ResAlign: gamma of the fine-tune's Moreau envelope",
    )
    richardson_steps: int = Field(default=5, gt=0, description="ResAlign: Richardson (Neumann) iterations K")
    richardson_damping: float = Field(
        default=0.25, gt=0, description="ResAlign: Richardson step (halved on divergence)"
    )
    finetune_samples: int = Field(
        default=2, gt=0, description="ResAlign: fine-tunes simulated per outer step (k)"
    )
    finetune_methods: list[Literal["lora", "full", "dreambooth"]] = Field(
        default_factory=lambda: ["lora", "full", "dreambooth"], min_length=1, description="ResAlign: sampled"
    )
    finetune_learning_rates: dict[Literal["lora", "full", "dreambooth"], list[float]] = Field(
        # Scaled to the world model (its attacks: LoRA 3e-3, full 5e-5); the paper's SD grid is 1e-4..1e-6.
        default_factory=lambda: {
            "lora": [3e-3, 1e-3, 3e-4],
            "full": [5e-5, 2e-5, 1e-5],
            "dreambooth": [5e-5, 2e-5, 1e-5],
        },
        description="ResAlign: Adam learning rates sampled per fine-tune method",
    )
    finetune_sgd_lr_scale: float = Field(
        default=200.0, gt=0, description="ResAlign: SGD's learning rate = the sampled (Adam) one x this"
    )
    finetune_steps: tuple[int, int] = Field(
        default=(5, 20), description="ResAlign: (min, max) fine-tune steps"
    )
    finetune_optimizers: list[Literal["sgd", "adam"]] = Field(
        default_factory=lambda: ["sgd", "adam"], min_length=1, description="ResAlign: sampled optimizers"
    )
    finetune_data: list[Literal["target", "retain"]] = Field(
        default_factory=lambda: ["target"],
        min_length=1,
        description="ResAlign: fine-tune data sampled from (retain: benign fine-tunes on the retain data)",
    )

    @model_validator(mode="before")
    @classmethod
    def _resalign_hypergradient_default(cls, data):
        if isinstance(data, dict) and data.get("method") == "resalign" and "hypergradient" not in data:
            return {**data, "hypergradient": "implicit"}
        return data

    @model_validator(mode="after")
    def _resalign_fields(self):
        if self.method == "resalign" and self.hypergradient not in ("implicit", "first_order"):
            raise ValueError(
                f"resalign takes hypergradient implicit or first_order, not {self.hypergradient}"
            )
        if self.method != "resalign" and self.hypergradient == "implicit":
            raise ValueError("hypergradient implicit is ResAlign's; use first_order or unrolled")
        low, high = self.finetune_steps
        if not 1 <= low <= high:
            raise ValueError(
                f"finetune_steps must be (min, max) with 1 <= min <= max, got {self.finetune_steps}"
            )
        for method in self.finetune_methods:
            rates = self.finetune_learning_rates.get(method)
            if not rates or not all(0 < rate < float("inf") for rate in rates):
                raise ValueError(f"finetune_learning_rates needs positive rates for {method}, got {rates}")
        return self

    average_from: int | None = Field(
        default=None,
        ge=0,
        description="release the mean of the trained tensors over the outer steps after this one (iterate "
        "averaging, a remedy for a min-max game that oscillates) instead of the last step's; None: the last step's",
    )
    seed: int = 0
    checkpoint_every: int = Field(default=50, gt=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.retain_sampling == "hard" and self.checkpoint_every % self.retain_refresh:
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of retain_refresh "
                f"({self.retain_refresh}) so that a resumed run re-measures the drift where the first did"
            )
        if self.retain_states == "sampler" and self.retain_loss == "diffusion" and self.method != "resalign":
            raise ValueError(
                "retain_states sampler needs retain_loss distill or guided: a sampler state has no clean "
                "image to fit, only the starting model's prediction to keep"
            )
        if self.retain_loss in ("guided", "rollout") and self.retain_unconditional:
            raise ValueError(
                f"retain_loss {self.retain_loss} already keeps the empty-prompt predictions (inside the "
                "guided one); remove retain_unconditional"
            )
        if self.retain_loss == "rollout":
            if self.method not in BILEVEL_METHODS:
                raise ValueError(
                    f"retain_loss rollout is the bi-level methods'; {self.method} takes distill or guided"
                )
            if self.retain_states != "sampler" or self.retain_sampling != "uniform":
                raise ValueError(
                    "retain_loss rollout follows the starting model's recorded trajectories: set retain_states "
                    "sampler (and keep retain_sampling uniform)"
                )
            if self.retain_rollout_steps >= self.retain_sampler_steps:
                raise ValueError(
                    f"retain_rollout_steps ({self.retain_rollout_steps}) must be under retain_sampler_steps "
                    f"({self.retain_sampler_steps}): a rollout ends at a recorded state"
                )
        if self.retain_projection is not None and (self.selection or "").startswith("text_"):
            raise ValueError(
                f"retain_projection covers the denoiser's layers; selection {self.selection} trains the text "
                "encoder: choose a denoiser selection"
            )
        if self.retain_projection_target_words and self.retain_projection is None:
            raise ValueError(
                "retain_projection_target_words refines retain_projection: set retain_projection too (e.g. 0.9)"
            )
        fields = type(self).model_fields
        for name, readers in FIELD_READERS.items():
            if self.method in readers:
                continue
            if getattr(self, name) != fields[name].get_default(call_default_factory=True):
                raise ValueError(f"{name} is read by {', '.join(readers)}, not by {self.method}; remove it")
        if self.inner_catch_up and self.max_loss is None:
            raise ValueError(
                "inner_catch_up steps the adversaries until their loss is within max_loss: set max_loss (e.g. 0.3)"
            )
        if self.average_from is not None and self.average_from >= self.steps:
            raise ValueError(
                f"average_from {self.average_from} leaves no step of {self.steps} to average: set it below steps"
            )
        if self.inner_restart and not self.inner_warm_start:
            raise ValueError(
                "inner_restart restarts adversaries that are carried between outer steps: remove it, or set "
                "inner_warm_start true"
            )
        if self.tokens is not None and len(self.tokens) != len(self.concepts):
            raise ValueError(f"tokens has {len(self.tokens)} entries for {len(self.concepts)} concepts")
        if self.tokens is not None and (self.prompt is None or "{token}" not in self.prompt):
            raise ValueError("tokens need a prompt template containing {token}")
        return self

    @model_validator(mode="after")
    def _adversaries(self):
        methods, rates = self.inner_method, self.inner_learning_rate
        if isinstance(methods, list):
            if not methods:
                raise ValueError("inner_method is an empty list; name at least one adapter")
            if len(set(methods)) != len(methods):
                raise ValueError(f"inner_method names an adapter twice: {methods}")
            if len(methods) > 1 and self.method == "compose":
                raise ValueError("compose's adversaries adapt K/V only; give it one inner_method")
            if len(methods) > 1 and self.method == "mima" and self.outer_models != "adapted":
                raise ValueError(
                    "several inner_method adapters need outer_models adapted for mima: the merge takes "
                    "one adapted model per concept"
                )
        if isinstance(rates, list):
            count = len(self.inner_methods())
            if len(rates) != count:
                raise ValueError(
                    f"inner_learning_rate has {len(rates)} entries for {count} inner_method adapter(s); "
                    "give one per adapter, or one number for all"
                )
        return self

    def retain_distill_guidance(self) -> float | None:
        """The guidance scale the retain distillation compares predictions at (retain_loss guided), else
        None: the conditional predictions as they are."""
        return self.retain_guidance_scale if self.retain_loss == "guided" else None

    def inner_methods(self) -> list[str]:
        """The lower level's adapters in order: one, or every entry of a list-valued inner_method."""
        value = self.resolved("inner_method")
        return list(value) if isinstance(value, list) else [value or "full"]

    def inner_learning_rates(self) -> list[float]:
        """Each adapter's lower-level step size, in `inner_methods` order (default per adapter: INNER_LR
        for SGD, the world attack's learning rate for Adam)."""
        methods, rates = self.inner_methods(), self.inner_learning_rate
        if isinstance(rates, list):
            return list(rates)
        if rates is not None:
            return [rates] * len(methods)
        if self.inner_optimizer == "adam":
            return [WORLD_ATTACK_SETTINGS[m]["learning_rate"] for m in methods]
        return [INNER_LR.get(m, 1e-2) for m in methods]

    def resolved(self, key: str):
        if key == "inner_learning_rate":
            rates = self.inner_learning_rates()
            if len(rates) > 1:
                raise ValueError("several inner_method adapters: read inner_learning_rates()")
            return rates[0]
        if key == "selection" and self.selection is None and self.method == "esd":
            return ESD_SELECTIONS[self.esd_variant]
        value = getattr(self, key)
        return METHOD_DEFAULTS[self.method][key] if value is None else value


def load_immunize_config(path: str | Path) -> ImmunizeConfig:
    return load_config(path, ImmunizeConfig)


# ----------------------------------------------------------------------------- data
def word_embeddings(model, prompts: list[str], word: str) -> Tensor:
    """Text embeddings [n, D] at every position where `word`'s tokens occur in `prompts`."""
    ids = model.tokenize(prompts)
    word_ids = model.tokenizer(word, add_special_tokens=False)["input_ids"]
    if not word_ids:
        raise DiffImmuneError(f"concept word '{word}' tokenizes to nothing")
    mask = torch.isin(ids, torch.tensor(word_ids, device=ids.device))
    if not mask.any():
        raise DiffImmuneError(
            f"concept word '{word}' does not occur in its prompts (e.g. '{prompts[0]}'); "
            "set prompt to a template that names it, or tokens for placeholder concepts"
        )
    with torch.no_grad():
        embeddings = model.encode_prompts(prompts)
    return embeddings[mask.to(embeddings.device)]


def prompt_fed_inputs(unet, embeddings: Tensor) -> dict[str, Tensor]:
    """The inputs [n, D] that the denoiser's prompt-fed layers (the K and V projections of every
    cross-attention) receive for the prompt embeddings `embeddings` [n, D], by layer local name: the
    embeddings themselves, or normalised where the attention normalises the prompt first (`norm_cross`)."""
    from diffusers.models.attention_processor import Attention

    inputs = {}
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and module.is_cross_attention):
            continue
        rows = embeddings
        if getattr(module, "norm_cross", None) is not None:
            with torch.no_grad():
                rows = module.norm_encoder_hidden_states(embeddings[None].to(module.to_k.weight))[0]
        inputs |= {f"{name}.{child}": rows for child in ("to_k", "to_v") if hasattr(module, child)}
    return inputs


@dataclass
class ConceptSamples:
    """One target concept's training data in the denoiser's space."""

    name: str
    word: str  # the word (or placeholder token) that names it in its prompts
    x0: Tensor
    prompts: list[str]
    weights: Tensor | None = None  # sampling probabilities of the images (None: uniform)
    timesteps: Tensor | None = None  # set: x0 holds noisy sampler states at these timesteps (distillation)

    def batch(self, size: int, generator: torch.Generator, prior: ConceptSamples | None, weight: float):
        if self.weights is None:
            index = torch.randint(0, len(self.x0), (size,), generator=generator)
        else:
            index = torch.multinomial(self.weights, size, replacement=True, generator=generator)
        batch = Batch(self.x0[index], [self.prompts[i] for i in index.tolist()])
        if self.timesteps is not None:
            batch.timesteps, batch.noisy = self.timesteps[index], True
        if prior is not None:
            prior_index = torch.randint(0, len(prior.x0), (size,), generator=generator)
            batch.prior = Batch(prior.x0[prior_index], [prior.prompts[i] for i in prior_index.tolist()])
            batch.prior_weight = weight
        return batch


def concept_word(spec: str) -> str:
    """The value a data string selects (`world:shape=heart` -> heart, `FOLDER::style=dots` -> dots)."""
    text = spec.split("world:", 1)[1] if spec.startswith("world:") else spec.partition("::")[2]
    if not text:
        raise DiffImmuneError(
            f"concept '{spec}' names no concept; write world:shape=NAME or FOLDER::col=NAME"
        )
    _, negate, values = parse_filter(text)
    if negate or len(values) != 1:
        raise DiffImmuneError(f"concept '{spec}' must select exactly one value (shape=heart)")
    return values[0]


def default_retain(concepts: list[str]) -> str | None:
    """On the world: every known shape that is not a target."""
    if not all(c.startswith("world:") for c in concepts):
        return None
    words = [concept_word(c) for c in concepts]
    return "world:shape!=" + ",".join(words)


RETAIN_STATE_SEED = 30000


def record_sampler_states(
    model, prompts: list[str], seeds: list[int], steps: int, scale: float, params=None
) -> tuple[Tensor, Tensor]:
    """The states the guided DDIM sampler of `model` (with `params` in place of its own tensors, if
    given) visits for each prompt from the noise of its seed: (states, timesteps), prompt-major (every
    state of a prompt's trajectory together), in float32 on the CPU."""
    states, timesteps = [], []
    with torch.no_grad():
        for start in range(0, len(prompts), 32):
            chunk = prompts[start : start + 32]
            recorded: list[tuple[Tensor, Tensor]] = []
            model.sample(
                chunk,
                model.initial_noise(seeds[start : start + 32]),
                steps,
                scale,
                params=params,
                on_state=lambda x, t, into=recorded: into.append((x, t)),
            )
            states.append(torch.stack([x for x, _ in recorded], 1).flatten(0, 1).float().cpu())
            times = torch.stack([torch.as_tensor(t).reshape(()) for _, t in recorded]).long().cpu()
            timesteps.append(times.repeat(len(chunk)))
    return torch.cat(states).contiguous(), torch.cat(timesteps)


def sampler_states(
    model, name: str, prompts: list[str], config: ImmunizeConfig, cache: Path
) -> ConceptSamples:
    """The states `model`'s guided DDIM sampler visits for each prompt (one trajectory per prompt, seeds
    30000..., `retain_sampler_steps` steps at `retain_guidance_scale`), as a pool of noisy samples with
    their timesteps and prompts; kept in the safetensors file `cache`, reused only for the same prompts,
    seeds and settings."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from diffimmune.files import atomic_file

    steps, scale = config.retain_sampler_steps, config.retain_guidance_scale
    seeds = [RETAIN_STATE_SEED + i for i in range(len(prompts))]
    key = hashlib.sha256(json.dumps([prompts, seeds, steps, scale]).encode()).hexdigest()
    tensors = None
    if cache.is_file():
        with safe_open(str(cache), "pt") as handle:
            if (handle.metadata() or {}).get("key") == key:
                tensors = {k: handle.get_tensor(k) for k in ("states", "timesteps")}
    if tensors is None:
        states, timesteps = record_sampler_states(model, prompts, seeds, steps, scale)
        tensors = {"states": states, "timesteps": timesteps}
        with atomic_file(cache) as temporary:
            save_file(tensors, str(temporary), metadata={"key": key})
    per_prompt = steps if len(prompts) == 0 else len(tensors["timesteps"]) // len(prompts)
    expanded = [p for p in prompts for _ in range(per_prompt)]
    states = tensors["states"].to(model.device, model.dtype)
    return ConceptSamples(name, "", states, expanded, timesteps=tensors["timesteps"].to(model.device))


ANCHOR_STATES = "anchor_states"


class SamplerAnchor:
    """ESD's erasure loss at the states the guided sampler visits for the target prompts, an extra term
    of GIFT's, ResAlign's and the bi-level methods' objectives (`anchor_weight`, a diffimmune extension): the
    target prompt's prediction there is pulled to the starting model's guided away from the target,
    eps0(x, "") - negative_guidance (eps0(x, c) - eps0(x, "")); with `anchor_reference`, eps0 is that
    model's (the model before an erasure, whose guidance still points at the concept).

    The states are the starting model's trajectories of the target prompts (`retain_sampler_steps` DDIM
    steps at `retain_guidance_scale`, one per prompt, kept in `anchor_states.safetensors`); with
    `anchor_refresh: N` they are re-recorded every N steps from the weights being trained, from fresh noise
    (ESD samples them with the model it trains), and carried as inner state so a resumed run reads the
    ones the first had. `anchor_selection` limits the trained tensors its gradient reaches."""

    def __init__(self, model, config: ImmunizeConfig, concepts, trained: list[str], out_dir: Path):
        self.model, self.config = model, config
        self.prompts = [prompt for concept in concepts for prompt in concept.prompts]
        self.pool = sampler_states(
            model, "anchor", self.prompts, config, out_dir / "anchor_states.safetensors"
        )
        # ESD's frozen copy: the model being trained, or `anchor_reference` (the model before an erasure)
        self.reference = model
        if config.anchor_reference is not None:
            from diffimmune.models.diffusion_model import load_model

            if config.anchor_reference == "base":
                raise DiffImmuneError(
                    "anchor_reference: base names an experiment's model; outside an experiment file give "
                    "the model's folder or hub id"
                )
            self.reference = load_model(config.anchor_reference, device=model.device, dtype=model.dtype)
        with torch.no_grad():
            self.empty = self.reference.encode_prompts([""])
        self.names = set(trained)
        if config.anchor_selection is not None:
            self.names = set(selection_names(config.anchor_selection, trained))
            if not self.names:
                raise DiffImmuneError(
                    f"anchor_selection {config.anchor_selection} picks none of the trained tensors "
                    f"(selection {config.resolved('selection')}): choose a selection inside it, such as xattn"
                )

    def inner_state(self) -> dict[str, Tensor]:
        """With `anchor_refresh`, the current states (carried in the checkpoints)."""
        return {ANCHOR_STATES: self.pool.x0} if self.config.anchor_refresh else {}

    def refresh(self, params: dict[str, Tensor], step: int, weights: dict[str, Tensor]) -> None:
        """Every `anchor_refresh` steps, the states become those the sampler of the model with `weights`
        in place visits for the target prompts, from fresh noise (seeds move on per refresh); in between,
        and on resume, the carried states (`params`' inner state)."""
        every = self.config.anchor_refresh
        if not every:
            return
        carried = params[INNER_PREFIX + ANCHOR_STATES]
        if step > 0 and step % every == 0:
            count = len(self.prompts)
            seeds = [RETAIN_STATE_SEED + (step // every) * count + i for i in range(count)]
            states, _ = record_sampler_states(
                self.model,
                self.prompts,
                seeds,
                self.config.retain_sampler_steps,
                self.config.retain_guidance_scale,
                params={n: v.detach() for n, v in weights.items()},
            )
            with torch.no_grad():
                carried.copy_(states.to(carried))
        self.pool.x0 = carried.detach()

    def batch(self, generator: torch.Generator) -> Batch:
        return self.pool.batch(self.config.batch_size, generator, None, 0.0)

    def loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """The distance between the target prompt's prediction under `params` and the erasure target at
        the states of `batch`; only the tensors of `anchor_selection` carry its gradient."""
        model = self.model
        params = {n: v if n in self.names else v.detach() for n, v in params.items()}
        x_t, timesteps = batch.x0, batch.timesteps
        with torch.no_grad():
            condition = self.reference.encode_prompts(batch.prompts)
        target = esd_target(
            self.reference, x_t, timesteps, condition, self.empty, self.config.negative_guidance
        )
        prediction = model.denoise(params, x_t, timesteps, model.encode_prompts(batch.prompts, params))
        return (prediction.float() - target.float()).pow(2).mean()


class Context:
    """The model, the config and the data an immunization step draws from."""

    def __init__(self, model, config: ImmunizeConfig, out_dir: Path, world=None):
        self.model = model
        self.config = config
        self.out_dir = out_dir
        self.concepts: list[ConceptSamples] = []
        for index, spec in enumerate(config.concepts):
            data = load_concept_data(spec, config.num_images, config.seed + index, world, model.image_size)
            token = config.tokens[index] if config.tokens else "sks"
            with torch.no_grad():
                x0 = model.encode_images(data.images)
            word = token if config.tokens else concept_word(spec)
            self.concepts.append(ConceptSamples(spec, word, x0, data.prompts(config.prompt, token)))
        self.retain_spec = config.retain or default_retain(config.concepts)
        self.retain: ConceptSamples | None = None
        self._retain_probe: tuple | None = None
        if self.retain_spec is not None:
            count = max(config.reg_prompts, config.num_images)
            data = load_concept_data(self.retain_spec, count, config.seed + 1000, world, model.image_size)
            with torch.no_grad():
                x0 = model.encode_images(data.images)
            self.retain = ConceptSamples(self.retain_spec, "", x0, data.captions)
        # What the retain loss draws from: the retain images, or the starting model's sampler states.
        self.retain_pool: ConceptSamples | None = self.retain
        if self.retain is not None and config.retain_states == "sampler":
            self.retain_pool = sampler_states(
                model, self.retain_spec, self.retain.prompts, config, out_dir / "retain_states.safetensors"
            )
        self.prior: ConceptSamples | None = None
        if config.resolved("prior_preservation"):
            from diffimmune.adapters.prior import class_images

            images = class_images(
                model, config.class_prompt, config.num_class_images, out_dir / "class_images.safetensors"
            )
            with torch.no_grad():
                x0 = model.encode_images(images)
            self.prior = ConceptSamples("prior", "", x0, [config.class_prompt] * len(x0))

    def refresh_retain_weights(self, released: dict[str, Tensor]) -> None:
        """Hard retain sampling: re-weight the retain images by how far the denoiser under `released`
        has drifted from the starting model on them (one fixed noisy sample per image; with
        `retain_unconditional`, the empty-prompt drift is added). Half of every draw stays uniform."""
        retain = self.retain_pool
        if retain is None:
            return
        if self._retain_probe is None:
            # sampler states are measured where they are; images at one fixed noisy sample each
            probe = Batch(
                retain.x0, retain.prompts, timesteps=retain.timesteps, noisy=retain.timesteps is not None
            )
            generator = torch.Generator().manual_seed(self.config.seed + 2000)
            x_t, timesteps = noisy_inputs(self.model, probe, generator)
            self._retain_probe = (x_t, timesteps, self._retain_predictions(None, x_t, timesteps))
        x_t, timesteps, reference = self._retain_probe
        found = self._retain_predictions(released, x_t, timesteps)
        scale = self.config.retain_distill_guidance()
        if scale is not None:  # the drift the guided retain loss measures
            found, reference = ([guided(torch.cat(halves), scale)] for halves in (found, reference))
        drift = sum((a - b).pow(2).flatten(1).mean(1) for a, b in zip(found, reference, strict=True))
        uniform = torch.full_like(drift, 1.0 / len(drift))
        total = drift.sum()
        retain.weights = uniform if total <= 0 else 0.5 * uniform + 0.5 * drift / total

    def retain_projection(self, trained: list[str]):
        """`retain_projection`: the bases of the trained denoiser layers, measured on the starting model over
        `retain_projection_samples` retain samples (drawn from the retain pool with seed + 3000, each at
        its own noise and timestep, or at its recorded sampler state), read under their prompts and under
        the empty prompt (the two halves classifier-free guidance combines)."""
        from diffimmune.core.projection import retain_bases

        config = self.config
        if self.retain_pool is None:
            raise DiffImmuneError(
                "retain_projection needs retain data: set retain to a data string of concepts to keep"
            )
        outside = [n for n in trained if not n.startswith("unet.")]
        if outside:
            raise DiffImmuneError(
                f"retain_projection covers the denoiser's layers; selection {config.resolved('selection')!r} "
                f"also trains {outside[0]} (and {len(outside) - 1} more): choose a denoiser selection"
            )
        pool = self.retain_pool
        generator = torch.Generator().manual_seed(config.seed + 3000)
        index = torch.randint(0, len(pool.x0), (config.retain_projection_samples,), generator=generator)
        batch = Batch(
            pool.x0[index],
            [pool.prompts[i] for i in index.tolist()],
            timesteps=None if pool.timesteps is None else pool.timesteps[index],
            noisy=pool.timesteps is not None,
        )
        x_t, timesteps = noisy_inputs(self.model, batch, generator)

        def run_retain() -> None:
            self._predictions(None, x_t, timesteps, batch.prompts, both_halves=True)

        kept = None
        if config.retain_projection_target_words:
            words = torch.cat([word_embeddings(self.model, c.prompts, c.word) for c in self.concepts])
            kept = prompt_fed_inputs(self.model.unet, words)
        return retain_bases(self.model.unet, "unet.", trained, run_retain, config.retain_projection, kept)

    def _retain_predictions(self, params, x_t: Tensor, timesteps: Tensor) -> list[Tensor]:
        both = self.config.retain_unconditional or self.config.retain_distill_guidance() is not None
        return self._predictions(params, x_t, timesteps, self.retain_pool.prompts, both)

    def _predictions(
        self, params, x_t: Tensor, timesteps: Tensor, prompts: list[str], both_halves: bool, chunk: int = 32
    ) -> list[Tensor]:
        """The denoiser's predictions under `params` (no grad, in chunks) at `x_t` for `prompts`, and with
        `both_halves` also for the empty prompt: one tensor per half."""
        halves = [prompts, [""] * len(prompts)] if both_halves else [prompts]
        found = []
        with torch.no_grad():
            for texts in halves:
                parts = []
                for start in range(0, len(x_t), chunk):
                    stop = start + chunk
                    embeddings = self.model.encode_prompts(texts[start:stop], params)
                    parts.append(
                        self.model.denoise(params, x_t[start:stop], timesteps[start:stop], embeddings)
                    )
                found.append(torch.cat(parts).float())
        return found

    def rollout_draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor, list[str], int]:
        """retain_loss rollout: one sampler step k (the same for the batch, so that it steps together) and
        `batch_size` recorded trajectories; their states at step k, at step k + retain_rollout_steps, and
        their prompts."""
        pool, steps = self.retain_pool, self.config.retain_sampler_steps
        count = self.config.retain_rollout_steps
        first = int(torch.randint(0, steps - count, (1,), generator=generator))
        which = torch.randint(0, len(pool.x0) // steps, (self.config.batch_size,), generator=generator)
        rows = which * steps + first  # the pool is prompt-major: a trajectory's states are consecutive
        return pool.x0[rows], pool.x0[rows + count], [pool.prompts[i] for i in rows.tolist()], first

    def batch(self, concept: ConceptSamples, generator: torch.Generator, with_prior: bool = True) -> Batch:
        prior = self.prior if with_prior else None
        return concept.batch(self.config.batch_size, generator, prior, self.config.prior_weight)

    def adapter(self, concept_index: int = 0, name: str | None = None):
        """The lower level's adapter `name` (default: the first of `inner_methods`); personalising ones
        learn concept `concept_index`'s token."""
        name = name or self.config.inner_methods()[0]
        return make_adapter(
            name,
            AdapterConfig(
                rank=self.config.inner_rank,
                token=self.config.tokens[concept_index] if self.config.tokens else "sks",
                seed=self.config.seed,
                selection=self.config.selection if name == "full" else None,
            ),
        )


class Method:
    """One immunizer: `trainable` released tensors, optional carried `inner_state`, and `step`."""

    name: str = ""

    def __init__(self, context: Context):
        self.context = context
        self.model = context.model
        self.config = context.config
        self.selection = self.config.resolved("selection")
        self.theta_names = list(select_parameters(self.model, self.selection))

    def inner_state(self) -> dict[str, Tensor]:
        """Lower-level state carried between outer steps (checkpointed with the weights)."""
        return {}

    def step(self, params: dict[str, Tensor], step: int, generator: torch.Generator):
        raise NotImplementedError

    def finalize(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The released tensors once training ends (ResAlign merges its LoRA into them here)."""
        return {n: params[n].detach() for n in self.theta_names}

    def projected(self, projection: RetainProjection, params: dict[str, Tensor]) -> RetainProjection:
        """`retain_projection` on the tensors `step` trains, given the released tensors' bases; it may
        move the starting `params` into the free directions. By default the released tensors train."""
        return projection


MethodFactory = Callable[[Context], Method]


def method_registry() -> dict[str, MethodFactory]:
    from diffimmune.methods.esd import ESD
    from diffimmune.methods.gift import GIFT
    from diffimmune.methods.imma import IMMA
    from diffimmune.methods.mima import MIMA, Compose, Joint
    from diffimmune.methods.resalign import ResAlign

    return {
        "imma": IMMA,
        "mima": MIMA,
        "joint": Joint,
        "compose": Compose,
        "esd": ESD,
        "gift": GIFT,
        "resalign": ResAlign,
    }


@dataclass
class ImmunizeRun:
    out_dir: Path
    delta_dir: Path
    config: ImmunizeConfig
    changed: list[str]
    last_metrics: dict


def immunize(
    model,
    config: ImmunizeConfig,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    world=None,
    log: Callable[[str], None] | None = None,
) -> ImmunizeRun:
    """Train `config.method` on `model` and write the changed tensors to OUT/delta. The model's own
    weights end up immunized too (they are the trained tensors)."""
    from diffimmune.core.train import as_step_output, train

    out_dir = ensure_writable_folder(out_dir, "immunization folder")
    record = {"config": config.model_dump(mode="json"), "model": model.source}
    # A longer or shorter run of the same settings resumes (constant learning rate, per-step seeds).
    replace_other_run(
        out_dir / "immunize.json",
        record,
        resume,
        what="an immunization",
        resumable={"steps", "checkpoint_every"},
        clear=[out_dir / "train", out_dir / RUN_DELTA, out_dir / "class_images.safetensors"],
        added=IMMUNIZE_FIELDS_ADDED,
    )
    write_json_atomic(out_dir / "immunize.json", record)
    context = Context(model, config, out_dir, world)
    method = method_registry()[config.method](context)
    named = model.named_parameters()
    reference = {n: named[n].detach().clone() for n in method.theta_names}
    theta = {n: named[n].detach().clone() for n in method.theta_names}
    carried = {INNER_PREFIX + k: v.detach().clone() for k, v in method.inner_state().items()}
    params = {**theta, **carried}
    averaging = config.average_from is not None
    if averaging:
        params |= {AVERAGE_PREFIX + n: v.clone() for n, v in theta.items()}
        params[AVERAGE_COUNT] = torch.zeros(())
    train_config = TrainConfig(
        steps=config.steps,
        learning_rate=config.learning_rate,
        optimizer=config.optimizer,
        grad_clip=config.grad_clip,
        log_every=max(1, min(10, config.steps // 4)),
        checkpoint_every=config.checkpoint_every,
        seed=config.seed,
    )

    projection = anchor = None
    if config.retain_projection is not None:
        projection = method.projected(context.retain_projection(method.theta_names), params)
        # Updates are projected back against the (projected) starting values; a released tensor left as it
        # was shares `reference` instead of holding another copy (SD-sized selections).
        anchor = {
            n: reference[n]
            if n in reference and torch.equal(params[n], reference[n])
            else params[n].detach().clone()
            for n in projection.names()
            if n in params
        }
        if log is not None:
            shape = projection.summary()
            log(
                f"retain_projection {config.retain_projection}: {shape['layers']} layers keep their retain "
                f"outputs ({shape['free_share']:.0%} of their input directions free on average), "
                f"{shape['frozen']} other trained tensor(s) frozen; bases {shape['megabytes']:.1f} MB"
                + (f", measured in {shape['passes']} retain passes" if shape["passes"] > 1 else "")
            )

    def step_fn(values, step, generator):
        output = _step(values, step, generator)
        if projection is not None:  # only feasible directions reach the optimiser's moments
            output = as_step_output(output, values)
            projection.project_(output.grads)
        return output

    def _step(values, step, generator):
        if config.retain_sampling == "hard" and context.retain_pool is not None:
            if step % config.retain_refresh == 0:
                context.refresh_retain_weights(method.finalize(values))
            elif context.retain_pool.weights is None:
                raise DiffImmuneError(
                    f"{out_dir} resumes at step {step}, between two drift measurements of hard retain "
                    f"sampling (every {config.retain_refresh} steps), so it cannot end as an unbroken run "
                    "would; set steps to a multiple of retain_refresh or pass --no-resume"
                )
        if averaging:  # the step sees the training state, not the running mean
            values = {k: v for k, v in values.items() if not k.startswith((AVERAGE_PREFIX, AVERAGE_COUNT))}
        return method.step(values, step, generator)

    def after_update(values):
        if projection is not None:
            projection.project_params_(values, anchor)
        if averaging:
            average_update(values, method.theta_names, config.average_from)

    result = train(
        params,
        step_fn,
        train_config,
        out_dir / "train",
        resume=resume,
        progress=progress,
        description=f"immunize {config.method}",
        after_update=after_update if projection is not None or averaging else None,
    )
    if averaging:
        for name in method.theta_names:
            params[name] = params[AVERAGE_PREFIX + name]
    final = method.finalize(params)
    model.load_parameters(final)
    changed = [n for n in final if not torch.equal(final[n], reference[n])]
    delta_dir = out_dir / RUN_DELTA
    model.save_delta(
        delta_dir,
        reference,
        method=config.method,
        selection=method.selection,
        hyperparameters=config.model_dump(mode="json"),
        extra={"last_metrics": result.last_metrics},
    )
    if log is not None:
        log(f"{config.method}: {len(changed)} tensor(s) changed; delta in {delta_dir}")
    return ImmunizeRun(out_dir, delta_dir, config, changed, result.last_metrics)


@torch.no_grad()
def average_update(params: dict[str, Tensor], names: list[str], start: int) -> None:
    """`average_from`, after each update: count the update and, past `start` of them, fold the updated
    tensors into their running mean (the first one past it replaces the starting copy)."""
    params[AVERAGE_COUNT].add_(1)
    taken = round(float(params[AVERAGE_COUNT])) - start  # how many iterates the mean holds with this one
    if taken <= 0:
        return
    for name in names:
        mean = params[AVERAGE_PREFIX + name]
        mean.add_(params[name] - mean, alpha=1.0 / taken)


def theta_of(params: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    return {n: params[n] for n in names}


def inner_of(params: dict[str, Tensor], prefix: str = INNER_PREFIX) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v.detach() for k, v in params.items() if k.startswith(prefix)}


@torch.no_grad()
def store_inner(params: dict[str, Tensor], values: dict[str, Tensor]) -> None:
    for key, value in values.items():
        params[INNER_PREFIX + key].copy_(value)
