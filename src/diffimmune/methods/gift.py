"""GIFT (Abdalla et al., "GIFT: Gradient-aware Immunization of diffusion models against malicious
Fine-Tuning with safe concepts retention", 2025).

What the paper says: immunization is a bi-level problem with no simulated adversary (it does not need to
know the attack). The *upper* level degrades the target ("malicious") concepts in two ways: it maximises
the diffusion loss on target data, and it *noises their representations*: the denoiser's intermediate
activations on target data, at many layers (down, mid and up blocks), are pushed towards Gaussian noise
of the same shape, measured by a multi-bandwidth RBF MMD (the representation-noising loss of RepNoise,
Rosati et al. 2024), weighted by beta. The idea is that a concept erased at every layer, not only at the
output, leaves a fine-tune nothing to re-use. The *lower* level preserves the model on safe data with
the ordinary diffusion loss (optionally DreamBooth's prior preservation), with its own step size. The
two levels alternate on the released weights:

    theta' = theta - alpha_P * grad L_safe(theta)                                  (lower: preserve)
    theta  <- theta' - alpha_I * grad U(theta'),
    U(theta) = sum_c [ -L_diff(theta; target_c) + beta * mean_l MMD(h_l(theta; target_c), N(0, I)) ]

What diffimmune does:
- one outer step = `inner_steps` SGD steps on safe data at `inner_learning_rate` (alpha_P; default 1e-2,
  INNER_LR's full-weight step), written back into the released weights, then the upper gradient at the
  preserved weights, which the training loop applies with its optimiser (`learning_rate`, alpha_I;
  Adam, clipping, schedule, checkpoints and resume as for every method);
- `hypergradient: first_order` is the paper's alternation (the upper gradient read at theta');
  `unrolled` differentiates U(theta - alpha_P grad L_safe(theta)) through the lower step (one extra
  double backward), so the upper step also accounts for how the preservation step will respond;
- the activations come from the same forward pass as the target loss (`core.hooks` on the module-name
  patterns `noise_layers`, hooks removed after every call), each compared as one vector per image with
  fresh noise of its shape by `core.mmd.mmd_rbf` at `mmd_bandwidths` times the median distance;
- safe data is `retain` (on the world: every other known shape), with the prior batch attached when
  `prior_preservation` is on; without either, GIFT refuses to start (it has nothing to preserve);
- several target concepts are handled at once: U sums over them (one target batch each), all read in
  one pass of the denoiser (`concept_terms`);
- `max_loss` stops ascending a concept's diffusion loss once it exceeds the bound (the representation
  term keeps working), and `beta: 0` turns representation noising off (maximisation + preservation);
- the default selection is the cross-attention (`xattn`), as in the paper; `attn` and `unet` work too.
  `inner_method`, `inner_rank` and `inner_warm_start` do not apply (no adversary; the lower level *is*
  the retain loss); `retain_loss: distill` makes the preservation step distil the starting model's
  predictions on the safe data instead of fitting their images (no prior term), and
  `retain_loss: guided` distils their classifier-free-guided combination;
- `retain_weight` (default 0, the paper) adds the same safe loss, on a fresh safe batch, to U at the
  preserved weights: a diffimmune extension. The preservation step is a plain SGD step, while the upper
  step goes through Adam, which moves every selected weight by about the learning rate however small its
  gradient; with the whole denoiser selected that wipes out the safe concepts (measured on the world), and
  a retain term inside the upper objective is what the bi-level methods use to hold them;
- `anchor_weight` (default 0, the paper) adds ESD's erasure loss to U: at the states the starting
  model's own sampler visits for the target prompts (`retain_sampler_steps` DDIM steps at
  `retain_guidance_scale`, one trajectory per target image prompt, kept in `anchor_states.safetensors`)
  the target prompt's prediction is pulled to the starting model's guided away from the target,
  eps0(x, "") - negative_guidance (eps0(x, c) - eps0(x, "")). A diffimmune extension: GIFT's loss
  ascent reads the denoiser on noised target *images*, and nothing in the paper's objective governs what
  the sampler draws for the target prompt from pure noise; measured on the world (one target, whole
  denoiser, started from UCE's erased model), two seeds of five released a model that drew the target
  in 25-81% of its generations before any attack, where the other three drew it in 0-16%;
- `anchor_refresh` (default 0: the starting model's states throughout) re-records the anchor's states
  every that many steps from the model being trained, from fresh noise, which is where ESD reads its
  loss (it samples the partially denoised states with the model it trains): the states a fixed pool
  holds stop being the ones the released model's sampler visits once the ascent moves it. The states
  are carried with the checkpoints, so a resumed run reads the ones the first had;
- `anchor_selection` (default: every trained tensor) lets the anchor's gradient reach only the trained
  tensors of a selection, e.g. `xattn`, the cross-attention that ESD-x trains (the other terms still
  reach all of them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffimmune.core.hooks import capture_activations, match_module_names
from diffimmune.core.hypergrad import gradient_step, hypergradient
from diffimmune.core.mmd import mmd_rbf
from diffimmune.core.objective import (
    Batch,
    batch_losses,
    diffusion_loss,
    distillation_loss,
    sample_noise_and_timesteps,
    with_null_prompts,
)
from diffimmune.core.train import StepOutput
from diffimmune.errors import DiffImmuneError
from diffimmune.methods.common import (
    Context,
    Method,
    SamplerAnchor,
    theta_of,
)


class GIFT(Method):
    name = "gift"

    def __init__(self, context: Context):
        super().__init__(context)
        if context.retain is None and context.prior is None:
            raise DiffImmuneError(
                "gift needs safe data to preserve: set retain (a data string such as FOLDER::style!=dots) "
                "or prior_preservation: true"
            )
        self.safe_lr = self.config.resolved("inner_learning_rate")
        self.noise_modules: list[str] = []
        if self.config.beta > 0:
            try:
                self.noise_modules = match_module_names(self.model.unet, self.config.noise_layers)
            except DiffImmuneError as error:
                raise DiffImmuneError(
                    f"noise_layers: {error}; set noise_layers to module-name patterns of the denoiser "
                    "(for a UNet: down_blocks.*, mid_block, up_blocks.*)"
                ) from None
        # `anchor_weight`: ESD's loss at the sampler's states for the target prompts.
        self.anchor = None
        if self.config.anchor_weight > 0:
            self.anchor = SamplerAnchor(
                self.model, self.config, context.concepts, self.theta_names, context.out_dir
            )

    def inner_state(self) -> dict[str, Tensor]:
        return self.anchor.inner_state() if self.anchor is not None else {}

    # -- the two levels
    def safe_batch(self, generator: torch.Generator) -> Batch:
        """A lower-level batch: retain data (prior images attached if enabled), else prior images only;
        with `retain_unconditional`, each image also under the empty prompt."""
        context = self.context
        if context.retain is not None:
            batch = context.batch(context.retain_pool, generator, with_prior=True)
        else:
            batch = context.batch(context.prior, generator, with_prior=False)
        if self.config.retain_unconditional:
            batch = with_null_prompts(self.model, batch, generator)
        return batch

    def safe_loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        if self.config.retain_loss != "diffusion":  # keep the starting model's predictions (no prior term)
            return distillation_loss(
                self.model, params, batch, guidance_scale=self.config.retain_distill_guidance()
            )
        return diffusion_loss(self.model, params, batch)

    def representation_noise(self, activations: dict[str, Tensor], seed: int) -> Tensor:
        """Mean over the captured layers of MMD^2(activations, Gaussian noise of their shape)."""
        generator = torch.Generator().manual_seed(seed)
        total = 0.0
        for name in self.noise_modules:
            activation = activations[name]
            noise = torch.randn(activation.shape, generator=generator, dtype=torch.float32)
            total = total + mmd_rbf(activation, noise.to(activation), self.config.mmd_bandwidths)
        return total / len(self.noise_modules)

    def upper_terms(self, params: dict[str, Tensor], batch: Batch, seed: int) -> tuple[Tensor, Tensor | None]:
        """One concept's target diffusion loss and representation-noising MMD (None when beta is 0),
        from one forward pass of the denoiser."""
        if not self.noise_modules:
            return diffusion_loss(self.model, params, batch), None
        with capture_activations(self.model.unet, self.config.noise_layers) as activations:
            loss = diffusion_loss(self.model, params, batch)
        return loss, self.representation_noise(activations, seed)

    def concept_terms(
        self, params: dict[str, Tensor], batches: list[tuple[Batch, int]]
    ) -> list[tuple[Tensor, Tensor | None]]:
        """`upper_terms` of every concept, from one forward pass of the denoiser over all their batches
        (each concept's activations are its own rows of the joined batch's). Falls back to one pass per
        concept for a single concept, prior parts, or a captured module whose output is not batch-first."""
        if len(batches) < 2 or any(batch.prior is not None for batch, _ in batches):
            return [self.upper_terms(params, batch, seed) for batch, seed in batches]
        plain = [batch for batch, _ in batches]
        if not self.noise_modules:
            return [(loss, None) for loss in batch_losses(self.model, params, plain)]
        sizes = [len(batch) for batch in plain]
        with capture_activations(self.model.unet, self.config.noise_layers) as activations:
            losses = batch_losses(self.model, params, plain)
        if any(value.shape[0] != sum(sizes) for value in activations.values()):
            return [self.upper_terms(params, batch, seed) for batch, seed in batches]
        parts = {name: value.split(sizes) for name, value in activations.items()}
        return [
            (loss, self.representation_noise({name: part[index] for name, part in parts.items()}, seed))
            for index, (loss, (_, seed)) in enumerate(zip(losses, batches, strict=True))
        ]

    def upper_loss(self, params: dict[str, Tensor], batches: list[tuple[Batch, int]], record: dict) -> Tensor:
        """U = sum over concepts of -L_diff + beta * MMD (minimised); fills `record` with the terms."""
        total = 0.0
        losses, distances = [], []
        for loss, distance in self.concept_terms(params, batches):
            losses.append(loss.item())
            ascended = loss
            if self.config.max_loss is not None and loss.item() > self.config.max_loss:
                ascended = loss.detach()  # high enough: leave the capacity to the other terms
            total = total - ascended
            if distance is not None:
                distances.append(distance.item())
                total = total + self.config.beta * distance
        record["target_loss"] = sum(losses) / len(losses)
        if distances:
            record["mmd"] = sum(distances) / len(distances)
        if not total.requires_grad:  # every concept past max_loss and beta 0: a zero gradient, not an error
            total = total + 0.0 * next(iter(params.values())).sum()
        return total

    # -- one outer step
    def step(self, params: dict[str, Tensor], step: int, generator: torch.Generator):
        theta = theta_of(params, self.theta_names)
        safe_batches = [
            _fixed_draws(self.model, self.safe_batch(generator), generator)
            for _ in range(self.config.inner_steps)
        ]
        target_batches = []
        for concept in self.context.concepts:
            batch = _fixed_draws(
                self.model, self.context.batch(concept, generator, with_prior=False), generator
            )
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            target_batches.append((batch, seed))

        weight = self.config.retain_weight
        # Drawn only when used, so that a run without the term keeps its random stream.
        retain_batch = _fixed_draws(self.model, self.safe_batch(generator), generator) if weight > 0 else None
        anchor_batch = None
        if self.anchor is not None:
            self.anchor.refresh(params, step, theta)
            anchor_batch = self.anchor.batch(generator)
        with torch.no_grad():
            safe_before = self.safe_loss(theta, safe_batches[0]).item()
        record: dict[str, float] = {}
        preserve = gradient_step(self.safe_loss, self.safe_lr)

        def upper(values, batches):
            total = self.upper_loss(values, batches, record)
            if retain_batch is not None:
                kept = self.safe_loss(values, retain_batch)
                record["retain_loss"] = kept.item()
                total = total + weight * kept
            if anchor_batch is not None:
                held = self.anchor.loss(values, anchor_batch)
                record["anchor_loss"] = held.item()
                total = total + self.config.anchor_weight * held
            return total

        mode = self.config.hypergradient
        result = hypergradient(
            {n: v.detach() for n, v in theta.items()},
            mode=mode,
            inner_step=preserve,
            inner_loss=self.safe_loss,
            outer_loss=upper,
            inner_batches=safe_batches,
            outer_batch=target_batches,
        )
        # The lower level's update is part of the released weights (GIFT alternates on one model).
        with torch.no_grad():
            for name in self.theta_names:
                params[name].copy_(result.adapted[name])
        metrics = {"safe_loss": safe_before, **record}
        return StepOutput(loss=result.outer_loss, grads=result.grads, metrics=metrics)


def _fixed_draws(model, batch: Batch, generator: torch.Generator) -> Batch:
    """Draw the batch's noise and timesteps now, so every evaluation of its loss sees the same ones
    (the unrolled graph, a finite-difference check, a re-run of the same step)."""
    noise, timesteps = sample_noise_and_timesteps(model, batch, generator)
    batch.noise, batch.timesteps = noise, timesteps
    if batch.prior is not None:
        _fixed_draws(model, batch.prior, generator)
    return batch
