"""ResAlign (Li et al., "Towards Resilient Safety-driven Unlearning for Diffusion Models against
Downstream Fine-tuning", NeurIPS 2025): unlearn so that the harm stays low *after* a fine-tune.

    L(W) = L_h(W) + lambda (mean_i L_h(phi*_i(W)) - L_h(W)) + w_r L_retain(W)

- W are the released attention weights, W = W0 + B A: a LoRA (rank `resalign_rank`) on the attention
  projections is what trains; the released tensors always hold the merged weights, so the delta (and an
  exported folder) is a plain diffusers model.
- L_h is the harmful loss on the target data: the negated diffusion loss (capped by `max_loss`) or, with
  `harmful_loss: esd`, ESD's loss towards the frozen model's negatively guided prediction.
- L_retain distils the frozen model's noise predictions on the retain data (`retain`; on the world, every
  other known shape), weighted by `retain_weight`; with `retain_loss: guided`, their classifier-free-guided
  combination.
- phi*_i is the result of a *sampled* fine-tune (`sample_finetunes`: method LoRA / full / DreamBooth,
  learning rate, steps, optimizer SGD / Adam and a data subset, each one an `AttackConfig`, drawn
  deterministically from (seed, step)), run with its own fresh optimizer (`FinetuneOptimizer`).
- d phi*/d W reads the fine-tune as the Moreau-envelope proximal problem
  phi* = argmin_phi L_ft(phi; W) + ||phi - phi0(W)||^2 / (2 gamma); the implicit function theorem gives
  (`moreau_surrogate`), with x = (I + gamma H)^{-1} dL_h/dphi solved by Richardson iterations of
  Hessian-vector products (`core.hypergrad`),

      dL_h(phi*)/dW = dphi0/dW^T x - gamma d/dW <x, grad_phi L_ft(phi*; W)> + partial_W L_h(phi*; W).

  The middle term is there for adapters whose loss reads W (LoRA on top of W); full fine-tuning and
  DreamBooth start at phi0(W) = W and keep only the first one. `hypergradient: first_order` uses x = g.

With `relearn_weight` (lambda) 0 no fine-tune is simulated: plain unlearning (the ablation).

`anchor_weight` (default 0, the paper) adds ESD's erasure loss at the states the guided sampler visits for
the target prompts (`SamplerAnchor`, shared with GIFT; `anchor_refresh` re-records them from the merged
weights during the run) to the direct terms: a diffimmune extension. L_h reads the denoiser on noised
target *images*; what the sampler draws for the target prompt from pure noise is governed by nothing else.

Unlike the official code, each simulated fine-tune gets a fresh optimizer state, Adam's bias correction
is applied once, and an error is raised, never turned into a zero loss. A Richardson solve that keeps
diverging falls back to the first-order gradient *loudly*: a warning line and the step's metrics
(`richardson_fallbacks`, `richardson_residual`, `richardson_iterations`, `richardson_backoffs`, and
`richardson_fallbacks_total`, a count kept in the checkpoints, so a fallback at an unlogged step shows).

The LoRA is merged into the released tensors at the start of every step (so checkpoints hold them) and
once more after the last update (`finalize`).

With `retain_projection` (core/projection.py) the LoRA's A factors start in, and move only within, each
layer's free input directions: then B A, the released change, leaves the layer's retain outputs where they
were, as the projection keeps the released change of the other methods.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from diffimmune.adapters.base import AdapterConfig, FullAdapter, LoRAAdapter, attack_adapter
from diffimmune.config import AttackConfig
from diffimmune.core.hypergrad import HypergradResult, ImplicitConfig, adam_step, hypergradient
from diffimmune.core.objective import (
    Batch,
    batch_losses,
    diffusion_loss,
    distillation_loss,
    esd_target,
    sample_noise_and_timesteps,
    second_order,
    with_null_prompts,
)
from diffimmune.core.projection import RetainProjection
from diffimmune.core.train import StepOutput, step_seed
from diffimmune.errors import DiffImmuneError
from diffimmune.methods.common import (
    INNER_PREFIX,
    ConceptSamples,
    Context,
    ImmunizeConfig,
    Method,
    SamplerAnchor,
)

logger = logging.getLogger(__name__)

Params = dict[str, Tensor]
LORA_PREFIX = "lora/"
# A running count of fallbacks, carried in the checkpointed state: exact across unlogged steps and resumes.
FALLBACK_COUNT = "richardson_fallbacks_total"
FINETUNE_TOKEN = "sks"
SAMPLER_SALT = 0x5E5A11


# ----------------------------------------------------------------------------- the sampler
def sample_finetunes(
    config: ImmunizeConfig,
    step: int,
    retain: str | None,
    retain_images: int,
    prior_preservation: bool = False,
) -> list[AttackConfig]:
    """The `finetune_samples` fine-tunes simulated at outer step `step`, a function of (seed, step) only.

    Each is an `AttackConfig` (the attack suite's schema): method, learning rate (the method's grid;
    SGD's scaled by `finetune_sgd_lr_scale`), steps in `finetune_steps`, optimizer, and data: a target
    concept (or, with `finetune_data` containing `retain`, the retain data as a benign fine-tune) whose
    subset of num_images (half to all of the loaded images) is chosen by `seed`.
    """
    rng = random.Random(step_seed(config.seed ^ SAMPLER_SALT, step))
    low, high = config.finetune_steps
    sampled = []
    for _ in range(config.finetune_samples):
        method = rng.choice(config.finetune_methods)
        learning_rate = rng.choice(config.finetune_learning_rates[method])
        optimizer = rng.choice(config.finetune_optimizers)
        if optimizer == "sgd":
            learning_rate *= config.finetune_sgd_lr_scale
        steps = rng.randint(low, high)
        source = rng.choice(config.finetune_data)
        if source == "retain":
            if retain is None:
                raise DiffImmuneError(
                    "finetune_data includes retain but there are no retain data; set retain"
                )
            data, available = retain, retain_images
            method_fields = {"method": "benign", "benign_method": "lora" if method == "lora" else "full"}
        else:
            data, available = rng.choice(config.concepts), config.num_images
            method_fields = {"method": method}
        personal = method == "dreambooth" and source == "target"
        sampled.append(
            AttackConfig(
                **method_fields,
                learning_rate=learning_rate,
                steps=steps,
                batch_size=config.batch_size,
                rank=config.inner_rank,
                optimizer=optimizer,
                data=data,
                num_images=rng.randint(math.ceil(available / 2), available),
                token=FINETUNE_TOKEN,
                prior_preservation=personal and prior_preservation,
                class_prompt=config.class_prompt if personal and prior_preservation else None,
                prior_weight=config.prior_weight,
                seed=rng.randrange(2**31),
                save_at=[steps],
            )
        )
    return sampled


# ----------------------------------------------------------------------------- the simulated fine-tune
class FinetuneOptimizer:
    """One simulated fine-tune's optimizer as a pure `InnerStep` (SGD or Adam, gradient clipping as the
    training loop does it). Its Adam moments live in the instance: make one per simulated fine-tune."""

    def __init__(
        self,
        loss_fn: Callable[[Params, Batch], Tensor],
        kind: str,
        learning_rate: float,
        grad_clip: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        if kind not in ("sgd", "adam", "adamw"):
            raise DiffImmuneError(f"simulated fine-tunes use sgd or adam, not {kind!r}")
        self.loss_fn, self.kind, self.learning_rate = loss_fn, kind, learning_rate
        self.grad_clip, self.betas, self.eps = grad_clip, betas, eps
        self.count = 0
        self.first_moment: Params = {}
        self.second_moment: Params = {}

    def __call__(self, params: Params, batch: Batch, *, create_graph: bool) -> Params:
        names = list(params)
        loss = self.loss_fn(params, batch)
        values = torch.autograd.grad(
            loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True
        )
        grads = {
            n: g if g is not None else torch.zeros_like(params[n]) for n, g in zip(names, values, strict=True)
        }
        if self.grad_clip is not None:  # as torch.nn.utils.clip_grad_norm_
            total = torch.sqrt(sum(g.detach().double().pow(2).sum() for g in grads.values()))
            coefficient = min(1.0, self.grad_clip / (float(total) + 1e-6))
            grads = {n: g * coefficient for n, g in grads.items()}
        if self.kind == "sgd":
            return {n: params[n] - self.learning_rate * grads[n] for n in names}
        self.count += 1
        # Bias correction exactly once (the official code applied it twice).
        updated, (first, second) = adam_step(
            params,
            grads,
            (self.first_moment, self.second_moment),
            self.count,
            self.learning_rate,
            self.betas,
            self.eps,
        )
        self.first_moment = {n: v.detach() for n, v in first.items()}
        self.second_moment = {n: v.detach() for n, v in second.items()}
        return updated


def moreau_surrogate(
    released: Params,
    *,
    init_state: Callable[[Params], Params],
    inner_loss: Callable[[Params, Params, Batch], Tensor],
    outer_loss: Callable[[Params, Params, Batch], Tensor],
    inner_step,
    inner_batches: Sequence[Batch],
    outer_batch,
    implicit: ImplicitConfig | None,
    loss_reads_released: bool = True,
) -> tuple[Tensor, HypergradResult]:
    """A scalar whose gradient w.r.t. `released` (and whatever they are computed from) is the
    hypergradient d outer(phi*(released), released) / d released, and the hypergradient's result.

    phi* comes from running `inner_step` over `inner_batches` from `init_state(released)` (no graph);
    `implicit` reads it as the proximal point of `inner_loss` with coefficient gamma (module docstring),
    None differentiates first-order (d phi*/d phi0 = I, no dependence of the fine-tune on `released`).
    `loss_reads_released=False` skips the mixed term for adapters whose loss ignores `released`.
    """
    fixed = {n: v.detach() for n, v in released.items()}
    start = {n: v.detach() for n, v in init_state(fixed).items()}
    result = hypergradient(
        start,
        mode="implicit" if implicit is not None else "first_order",
        inner_step=inner_step,
        inner_loss=lambda state, batch: inner_loss(state, fixed, batch),
        outer_loss=lambda state, batch: outer_loss(state, fixed, batch),
        inner_batches=inner_batches,
        outer_batch=outer_batch,
        implicit=implicit,
    )
    x, adapted = result.grads, result.adapted
    surrogate = sum((x[n] * value).sum() for n, value in init_state(released).items() if value.requires_grad)
    if implicit is not None and loss_reads_released:
        chosen = (
            list(inner_batches)[-implicit.hessian_batches :] if implicit.hessian_batches else inner_batches
        )
        leaves = {n: v.detach().requires_grad_(True) for n, v in adapted.items()}
        with second_order():  # this gradient is differentiated again (the fused kernels cannot be)
            loss = sum(inner_loss(leaves, released, batch) for batch in chosen) / len(chosen)
            names = list(leaves)
            grads = torch.autograd.grad(
                loss, [leaves[n] for n in names], create_graph=True, allow_unused=True
            )
        mixed = sum((x[n] * g).sum() for n, g in zip(names, grads, strict=True) if g is not None)
        surrogate = surrogate - implicit.gamma * mixed
    surrogate = surrogate + outer_loss(adapted, released, outer_batch)
    return surrogate, result


@dataclass
class FinetuneData:
    """A simulated fine-tune's training samples (a subset of the loaded images) and its prompts."""

    x0: Tensor
    prompts: list[str]
    prior: ConceptSamples | None


# ----------------------------------------------------------------------------- the method
class ResAlign(Method):
    name = "resalign"

    def __init__(self, context: Context):
        super().__init__(context)
        config = self.config
        self.lora = LoRAAdapter(
            AdapterConfig(rank=config.resalign_rank, lora_targets=self.selection, seed=config.seed)
        )
        # The released tensors are the LoRA's targets (2-D weights); biases stay as they are.
        self.theta_names = self.lora.base_names(self.model)
        named = self.model.named_parameters()
        self.original = {n: named[n].detach().clone() for n in self.theta_names}
        self.frozen = {n: t.detach() for n, t in named.items() if n.startswith("unet.")}
        self.retain_images = len(context.retain.x0) if context.retain is not None else 0
        if "retain" in config.finetune_data and context.retain is None:
            raise DiffImmuneError("finetune_data includes retain but there are no retain data; set retain")
        if config.harmful_loss == "esd":
            with torch.no_grad():
                self.empty = self.model.encode_prompts([""])
        self.anchor = None
        if config.anchor_weight > 0:
            self.anchor = SamplerAnchor(
                self.model, config, context.concepts, self.theta_names, context.out_dir
            )

    def inner_state(self) -> dict[str, Tensor]:
        lora = self.lora.init_state(self.model, self.original)
        anchor = self.anchor.inner_state() if self.anchor is not None else {}
        return {**{LORA_PREFIX + k: v for k, v in lora.items()}, FALLBACK_COUNT: torch.zeros(1), **anchor}

    def merged(self, lora_state: Params) -> Params:
        """W0 + B A for every released tensor (differentiable in the LoRA state)."""
        return self.lora.view(self.model, self.original, lora_state)

    def implicit_config(self) -> ImplicitConfig | None:
        if self.config.hypergradient == "first_order":
            return None
        return ImplicitConfig(
            gamma=self.config.proximal_gamma,
            iterations=self.config.richardson_steps,
            alpha=self.config.richardson_damping,
            hessian_batches=1,
        )

    # -- losses
    def fixed_draws(self, batch: Batch, generator: torch.Generator) -> Batch:
        """The batch with its noise and timesteps drawn now, so every loss of it sees the same x_t."""
        batch.noise, batch.timesteps = sample_noise_and_timesteps(self.model, batch, generator)
        if batch.prior is not None:
            self.fixed_draws(batch.prior, generator)
        return batch

    def harmful_batches(self, generator: torch.Generator) -> list[Batch]:
        batches = []
        for concept in self.context.concepts:
            batch = self.fixed_draws(self.context.batch(concept, generator, with_prior=False), generator)
            if self.config.harmful_loss == "esd":
                x_t = self.model.scheduler.add_noise(batch.x0, batch.noise, batch.timesteps)
                condition = self.model.encode_prompts(batch.prompts)
                eta = self.config.negative_guidance
                target = esd_target(self.model, x_t, batch.timesteps, condition, self.empty, eta)
                batch.meta = {"x_t": x_t, "condition": condition, "target": target}
            batches.append(batch)
        return batches

    def harmful_loss(self, params: Params, batches: list[Batch], capped: list[bool] | None = None) -> Tensor:
        """L_h summed over the target concepts (minimised), every concept read in one denoiser pass.
        `capped`, if given, receives one flag per batch: whether its loss was past `max_loss` (no
        gradient from it)."""
        if self.config.harmful_loss == "esd":
            sizes = [len(batch) for batch in batches]
            predictions = self.model.denoise(
                params,
                torch.cat([batch.meta["x_t"] for batch in batches]),
                torch.cat([batch.timesteps for batch in batches]),
                torch.cat([batch.meta["condition"] for batch in batches]),
            ).split(sizes)
            return sum(
                (prediction.float() - batch.meta["target"].float()).pow(2).mean()
                for prediction, batch in zip(predictions, batches, strict=True)
            )
        total = 0.0
        # the batches' noise and timesteps are fixed (fixed_draws), so nothing is drawn here
        for loss in batch_losses(self.model, params, batches):
            past = self.config.max_loss is not None and loss.item() > self.config.max_loss
            if capped is not None:
                capped.append(past)
            if past:  # high enough: no gradient, but still a graph to differentiate
                loss = loss.detach() + 0.0 * loss
            total = total - loss
        return total

    def retain_loss(self, params: Params, generator: torch.Generator) -> Tensor:
        """Distillation of the frozen model's noise predictions on the retain data."""
        batch = self.fixed_draws(
            self.context.batch(self.context.retain_pool, generator, with_prior=False), generator
        )
        if self.config.retain_unconditional:
            batch = with_null_prompts(self.model, batch, generator)
        return distillation_loss(
            self.model, params, batch, guidance_scale=self.config.retain_distill_guidance()
        )

    # -- the simulated fine-tune
    def finetune_data(self, attack: AttackConfig) -> FinetuneData:
        if attack.data == self.context.retain_spec and attack.method == "benign":
            samples = self.context.retain
        else:
            samples = self.context.concepts[self.config.concepts.index(attack.data)]
        generator = torch.Generator().manual_seed(attack.seed)
        chosen = torch.randperm(len(samples.x0), generator=generator)[: attack.num_images]
        prompts = [samples.prompts[i] for i in chosen.tolist()]
        if attack.method == "dreambooth" and samples.word:
            # DreamBooth learns the concept under a rare token: its captions with the word replaced.
            pattern = re.compile(rf"\b{re.escape(samples.word)}\b")
            prompts = [pattern.sub(attack.token, p) for p in prompts]
        prior = self.context.prior if attack.prior_preservation else None
        return FinetuneData(samples.x0[chosen], prompts, prior)

    def finetune_batches(self, attack: AttackConfig, data: FinetuneData, generator) -> list[Batch]:
        batches = []
        for _ in range(attack.steps):
            index = torch.randint(0, len(data.x0), (attack.batch_size,), generator=generator)
            batch = Batch(data.x0[index], [data.prompts[i] for i in index.tolist()])
            if data.prior is not None:
                prior_index = torch.randint(0, len(data.prior.x0), (attack.batch_size,), generator=generator)
                batch.prior = Batch(
                    data.prior.x0[prior_index], [data.prior.prompts[i] for i in prior_index.tolist()]
                )
                batch.prior_weight = attack.prior_weight
            batches.append(self.fixed_draws(batch, generator))
        return batches

    def finetune_adapter(self, attack: AttackConfig):
        return attack_adapter(attack)

    def simulate(
        self, attack: AttackConfig, released: Params, outer_batches: list[Batch], generator: torch.Generator
    ) -> tuple[Tensor, HypergradResult]:
        """One sampled fine-tune of the model with released tensors `released` (W): the surrogate whose
        gradient is d L_h(phi*(W)) / dW (`moreau_surrogate`) and the hypergradient's result, whose info
        has `relearn_active`: the share of target batches whose loss after the fine-tune is within
        `max_loss`, the only ones that give the relearn term a gradient."""
        adapter = self.finetune_adapter(attack)
        names = adapter.base_names(self.model)
        data = self.finetune_data(attack)
        batches = self.finetune_batches(attack, data, generator)

        def base_of(weights: Params) -> Params:
            every = {**self.frozen, **weights}
            return {n: every[n] for n in names}

        def model_params(state: Params, weights: Params) -> Params:
            return {**weights, **adapter.view(self.model, base_of(weights), state)}

        def finetune_loss(state: Params, weights: Params, batch: Batch) -> Tensor:
            return diffusion_loss(self.model, model_params(state, weights), batch)

        capped: list[bool] = []

        def outer(state: Params, weights: Params, batches: list[Batch]) -> Tensor:
            capped.clear()  # the flags of the last evaluation, at the fine-tuned weights
            return self.harmful_loss(model_params(state, weights), batches, capped)

        fixed = {n: v.detach() for n, v in released.items()}
        optimizer = FinetuneOptimizer(
            lambda state, batch: finetune_loss(state, fixed, batch),
            attack.optimizer,
            attack.learning_rate,
            attack.grad_clip,
        )
        surrogate, result = moreau_surrogate(
            released,
            init_state=lambda weights: adapter.init_state(self.model, base_of(weights)),
            inner_loss=finetune_loss,
            outer_loss=outer,
            inner_step=optimizer,
            inner_batches=batches,
            outer_batch=outer_batches,
            implicit=self.implicit_config(),
            loss_reads_released=not isinstance(adapter, FullAdapter),
        )
        result.info["relearn_active"] = 1.0 - sum(capped) / len(capped) if capped else 1.0
        return surrogate, result

    # -- one outer step
    def lora_state(self, params: Params) -> Params:
        prefix = INNER_PREFIX + LORA_PREFIX
        return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}

    def step(self, params: dict[str, Tensor], step: int, generator: torch.Generator):
        config = self.config
        lora = self.lora_state(params)
        merged = self.merged(lora)
        with torch.no_grad():  # the released tensors always hold the merged weights (checkpoints, delta)
            for name in self.theta_names:
                params[name].copy_(merged[name])
        relearn = config.relearn_weight
        outer_batches = self.harmful_batches(generator)
        leaves = list(lora.values())
        harmful = self.harmful_loss(merged, outer_batches)
        direct = (1 - relearn) * harmful
        metrics = {"harmful_loss": harmful.item()}
        retain_value = 0.0
        if config.retain_weight > 0 and self.context.retain is not None:
            retain = self.retain_loss(merged, generator)
            retain_value = retain.item()
            metrics["retain_loss"] = retain_value
            direct = direct + config.retain_weight * retain
        anchor_value = 0.0
        if self.anchor is not None:  # drawn after the retain batch: runs without it keep their stream
            self.anchor.refresh(params, step, merged)
            anchor = self.anchor.loss(merged, self.anchor.batch(generator))
            anchor_value = anchor.item()
            metrics["anchor_loss"] = anchor_value
            direct = direct + config.anchor_weight * anchor
        grads = list(torch.autograd.grad(direct, leaves, allow_unused=True))
        after = []
        if relearn > 0:
            attacks = sample_finetunes(
                config, step, self.context.retain_spec, self.retain_images, self.context.prior is not None
            )
            solver = []
            for attack in attacks:
                surrogate, result = self.simulate(attack, self.merged(lora), outer_batches, generator)
                values = torch.autograd.grad(surrogate, leaves, allow_unused=True)
                scale = relearn / len(attacks)
                grads = [
                    _add(g, None if v is None else scale * v) for g, v in zip(grads, values, strict=True)
                ]
                after.append(result.outer_loss)
                solver.append(result.info)
                if result.info.get("fallback"):
                    logger.warning(
                        "resalign step %d: the Richardson solve for the simulated %s fine-tune (lr %.3g, %d "
                        "steps, %s) diverged; used the first-order hypergradient (residual %.3g)",
                        step + 1,
                        attack.adapter_name,
                        attack.learning_rate,
                        attack.steps,
                        attack.optimizer,
                        result.info["residual"],
                    )
            metrics["harmful_loss_after_finetune"] = sum(after) / len(after)
            metrics["finetune_steps"] = sum(a.steps for a in attacks) / len(attacks)
            # Which fine-tunes could teach the target back, and how many left its loss low enough
            # (within max_loss) for the relearn term to push against them.
            metrics["finetune_on_target"] = sum(a.data in config.concepts for a in attacks) / len(attacks)
            metrics["relearn_active"] = sum(i["relearn_active"] for i in solver) / len(solver)
            if config.hypergradient == "implicit":
                metrics |= {
                    "richardson_residual": max(float(i["residual"]) for i in solver),
                    "richardson_iterations": sum(i["iterations"] for i in solver) / len(solver),
                    "richardson_backoffs": float(sum(i["backoffs"] for i in solver)),
                    "richardson_fallbacks": float(sum(bool(i["fallback"]) for i in solver)),
                }
                with torch.no_grad():
                    params[INNER_PREFIX + FALLBACK_COUNT] += metrics["richardson_fallbacks"]
                metrics[FALLBACK_COUNT] = params[INNER_PREFIX + FALLBACK_COUNT].item()
        loss = (1 - relearn) * harmful.item() + config.retain_weight * retain_value
        loss += config.anchor_weight * anchor_value
        if after:
            loss += relearn * sum(after) / len(after)
        names = list(lora)
        output = {
            INNER_PREFIX + LORA_PREFIX + n: g for n, g in zip(names, grads, strict=True) if g is not None
        }
        return StepOutput(loss=loss, grads=output, metrics=metrics)

    @torch.no_grad()
    def finalize(self, params: Params) -> Params:
        return {n: t.detach() for n, t in self.merged(self.lora_state(params)).items()}

    def projected(self, projection: RetainProjection, params: Params) -> RetainProjection:
        """`retain_projection` on the LoRA: W - W0 = B A keeps a layer's retain outputs when A's rows lie
        in the layer's free input directions, so A starts there and its changes are projected onto them.
        A released tensor the projection freezes keeps B at zero."""
        prefix = INNER_PREFIX + LORA_PREFIX
        layers = []
        for layer in projection.layers:
            if layer.bias is not None:  # the LoRA targets weights only; their biases are not trained
                raise DiffImmuneError(f"retain_projection: {layer.bias} is not a tensor ResAlign trains")
            layers.append(replace(layer, weight=f"{prefix}{layer.weight}.lora_A"))
        frozen = [f"{prefix}{name}.lora_B" for name in projection.frozen]
        factors = RetainProjection(layers, frozen, projection.passes)
        factors.project_(params)  # the starting A into the free directions (B starts at zero)
        return factors


def _add(total: Tensor | None, value: Tensor | None) -> Tensor | None:
    if value is None:
        return total
    return value if total is None else total + value
