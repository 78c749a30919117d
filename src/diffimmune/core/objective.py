"""The one objective: the denoising diffusion loss of a parameter dict on a batch.

    L(params) = mean_i w_i || f_params(x_t, c_i, t_i) - target_i ||^2,
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  target = eps | v | x0 (the scheduler's prediction type)

with optional prior preservation (DreamBooth): a second batch whose mean loss is added with a weight.
Every method and attack calls `diffusion_loss`; randomness (t, eps) comes from an explicit generator so a
step is a pure function of (params, batch, seed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffimmune.errors import DiffImmuneError


@dataclass
class Batch:
    """Training samples in the denoiser's space (VAE latents or [-1,1] pixels) and their prompts."""

    x0: Tensor
    prompts: list[str]
    prior: Batch | None = None
    prior_weight: float = 1.0
    noise: Tensor | None = None
    timesteps: Tensor | None = None
    meta: dict = field(default_factory=dict)
    # True: x0 holds noisy samples x_t at `timesteps` (a sampler's states), not clean images. Only
    # `distillation_loss` reads such a batch (there is no clean image or noise to fit).
    noisy: bool = False

    def __post_init__(self):
        if len(self.prompts) != self.x0.shape[0]:
            raise DiffImmuneError(f"batch has {self.x0.shape[0]} samples but {len(self.prompts)} prompts")
        if self.noisy and self.timesteps is None:
            raise DiffImmuneError("a batch of noisy samples needs the timesteps they were taken at")

    def __len__(self) -> int:
        return self.x0.shape[0]


@contextlib.contextmanager
def math_attention():
    """Use the math attention kernel, the one that supports double backward (HVPs, unrolled inner
    steps); the fused kernels do not. Costs speed, so only second-order code paths enter it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def second_order():
    """The kernels of a pass whose gradient is differentiated again (unrolled inner steps, HVPs): the math
    attention kernel (`math_attention`), and a convolution with a frozen weight whose backward is a
    transposed convolution (`_FrozenWeightConv`). PyTorch's own double backward of a convolution computes
    the weight's second-order gradient even when the weight is frozen (one weight-gradient convolution per
    layer, often with a kernel the size of the image), which no hypergradient here reads. Same values,
    same derivatives; only the work differs."""
    from torch import nn

    original = nn.Conv2d._conv_forward

    def conv_forward(module, input, weight, bias):
        if (
            module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
            and torch.is_grad_enabled()
            and input.requires_grad
            and not weight.requires_grad
            and (bias is None or not bias.requires_grad)
        ):
            stride, padding, dilation = module.stride, module.padding, module.dilation
            return _FrozenWeightConv.apply(input, weight, bias, stride, padding, dilation, module.groups)
        return original(module, input, weight, bias)

    with math_attention():
        nn.Conv2d._conv_forward = conv_forward
        try:
            yield
        finally:
            nn.Conv2d._conv_forward = original


class _FrozenWeightConv(torch.autograd.Function):
    """conv2d(x, W, b) for a W and b that take no gradient. Its backward, the input's gradient, is the
    transposed convolution of the output's gradient, written with differentiable operations, so that
    differentiating it again (w.r.t. the output's gradient) is one convolution and nothing for W."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups):
        output = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        kernel = weight.shape[2:]
        # The rows and columns a strided convolution drops: the transposed one must put them back.
        ctx.output_padding = tuple(
            input.shape[2 + i]
            - ((output.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
            for i in range(2)
        )
        ctx.settings = (stride, padding, dilation, groups)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.settings
        grad_input = torch.nn.functional.conv_transpose2d(
            grad_output, weight, None, stride, padding, ctx.output_padding, groups, dilation
        )
        return grad_input, None, None, None, None, None, None


def sample_noise_and_timesteps(model, batch: Batch, generator: torch.Generator | None):
    """Draw eps and t on the CPU from `generator` (device-independent), unless the batch fixes them."""
    x0 = batch.x0
    noise = batch.noise
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    timesteps = batch.timesteps
    if timesteps is None:
        count = model.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, count, (x0.shape[0],), generator=generator)
    return noise, timesteps.to(x0.device)


def noisy_inputs(model, batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(x_t, t) at which the denoiser reads `batch`: a `noisy` batch's own states, else its images
    noised with drawn (or the batch's fixed) noise and timesteps."""
    if batch.noisy:
        return batch.x0, batch.timesteps.to(batch.x0.device)
    noise, timesteps = sample_noise_and_timesteps(model, batch, generator)
    return model.scheduler.add_noise(batch.x0, noise, timesteps), timesteps


def with_null_prompts(model, batch: Batch, generator: torch.Generator | None, null_prompt: str = "") -> Batch:
    """`batch` twice: as it is, and with every prompt replaced by `null_prompt`, on the same noisy
    samples (noise and timesteps drawn once, unless the batch fixes them; the prior batch is kept).

    A retain loss on it keeps the unconditional predictions too, which classifier-free guidance
    amplifies at sampling (prediction = uncond + s (cond - uncond)): a defence that trains the whole
    denoiser and keeps only the conditional predictions lets the unconditional ones drift."""
    noise, timesteps = sample_noise_and_timesteps(model, batch, generator)
    return Batch(
        x0=torch.cat([batch.x0, batch.x0]),
        prompts=[*batch.prompts, *([null_prompt] * len(batch))],
        prior=batch.prior,
        prior_weight=batch.prior_weight,
        noise=torch.cat([noise, noise]),
        timesteps=torch.cat([timesteps, timesteps]),
        meta=dict(batch.meta),
        noisy=batch.noisy,
    )


def _require_clean(batch: Batch) -> None:
    if batch.noisy:
        raise DiffImmuneError(
            "the diffusion loss needs clean images, not sampler states; use retain_loss: distill"
        )


def diffusion_target(model, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    kind = model.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return model.scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise DiffImmuneError(
        f"scheduler prediction_type '{kind}' is not supported; use epsilon, v_prediction or sample"
    )


def min_snr_weights(model, timesteps: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): caps the weight of the easy, low-noise steps,
    which speeds up pre-training. Expressed for the model's prediction type."""
    alphas_cumprod = model.scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    capped = snr.clamp(max=gamma)
    if model.prediction_type == "v_prediction":
        return capped / (snr + 1)
    if model.prediction_type == "sample":
        return capped
    return capped / snr


def per_sample_loss(
    model,
    params: dict[str, Tensor] | None,
    batch: Batch,
    generator: torch.Generator | None = None,
    text_embeddings: Tensor | None = None,
    snr_gamma: float | None = None,
) -> Tensor:
    """The squared error of each sample [B] (no prior term), optionally min-SNR weighted."""
    _require_clean(batch)
    noise, timesteps = sample_noise_and_timesteps(model, batch, generator)
    x_t = model.scheduler.add_noise(batch.x0, noise, timesteps)
    if text_embeddings is None:
        text_embeddings = model.encode_prompts(batch.prompts, params)
    prediction = model.denoise(params, x_t, timesteps, text_embeddings)
    target = diffusion_target(model, batch.x0, noise, timesteps)
    # Half-precision predictions are compared in float32; float64 stays float64 (finite-difference tests).
    precision = torch.promote_types(prediction.dtype, torch.float32)
    losses = (prediction.to(precision) - target.to(precision)).pow(2).flatten(1).mean(1)
    if snr_gamma is not None:
        losses = losses * min_snr_weights(model, timesteps, snr_gamma).to(precision)
    return losses


def diffusion_loss(
    model,
    params: dict[str, Tensor] | None,
    batch: Batch,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
) -> Tensor:
    """Mean diffusion loss of `batch` under `params`, plus `prior_weight` x the prior batch's loss.
    The instance and prior samples go through the denoiser in one forward pass."""
    _require_clean(batch)
    if batch.prior is None:
        return per_sample_loss(model, params, batch, generator, snr_gamma=snr_gamma).mean()
    prior = batch.prior
    noise, timesteps = sample_noise_and_timesteps(model, batch, generator)
    prior_noise, prior_timesteps = sample_noise_and_timesteps(model, prior, generator)
    joined = Batch(
        x0=torch.cat([batch.x0, prior.x0]),
        prompts=[*batch.prompts, *prior.prompts],
        noise=torch.cat([noise, prior_noise]),
        timesteps=torch.cat([timesteps, prior_timesteps]),
    )
    losses = per_sample_loss(model, params, joined, snr_gamma=snr_gamma)
    count = len(batch)
    return losses[:count].mean() + batch.prior_weight * losses[count:].mean()


def batch_losses(
    model,
    params: dict[str, Tensor] | None,
    batches: list[Batch],
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """`diffusion_loss` of each batch under the same `params`, in one pass of the denoiser.

    Noise and timesteps are drawn batch by batch in the order the separate calls would draw them, so
    the values match `[diffusion_loss(model, params, b, generator) for b in batches]` up to the
    rounding of a larger batch; one pass over N batches costs well under N passes (an upper loss that
    scores several concepts on one model). Batches with a prior part are read one by one."""
    if len(batches) < 2 or any(b.prior is not None for b in batches):
        return [diffusion_loss(model, params, b, generator) for b in batches]
    for batch in batches:
        _require_clean(batch)
    drawn = [sample_noise_and_timesteps(model, b, generator) for b in batches]
    joined = Batch(
        x0=torch.cat([b.x0 for b in batches]),
        prompts=[p for b in batches for p in b.prompts],
        noise=torch.cat([noise for noise, _ in drawn]),
        timesteps=torch.cat([timesteps for _, timesteps in drawn]),
    )
    losses = per_sample_loss(model, params, joined)
    return [part.mean() for part in losses.split([len(b) for b in batches])]


def distillation_loss(
    model,
    params: dict[str, Tensor] | None,
    batch: Batch,
    generator: torch.Generator | None = None,
    guidance_scale: float | None = None,
) -> Tensor:
    """Mean squared distance between the denoiser's predictions under `params` and the model's own
    (frozen) predictions on the same noisy samples of `batch` (no prior term). A retain loss that keeps
    the model's function on the retain data, not only its fit to the images. A `noisy` batch is read
    at its own states and timesteps.

    With `guidance_scale` s, the distance is between the classifier-free-guided predictions
    uncond + s (cond - uncond), each sample read under its prompt and under the empty prompt at the same
    state: the prediction the sampler steps with, in which a drift of the difference between the two
    halves counts s times."""
    x_t, timesteps = noisy_inputs(model, batch, generator)
    prompts = list(batch.prompts)
    if guidance_scale is not None:  # both halves on the same states, in one pass
        x_t, timesteps = torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps])
        prompts += [""] * len(batch)
    with torch.no_grad():
        target = model.denoise(None, x_t, timesteps, model.encode_prompts(prompts))
    prediction = model.denoise(params, x_t, timesteps, model.encode_prompts(prompts, params))
    if guidance_scale is not None:
        target, prediction = guided(target, guidance_scale), guided(prediction, guidance_scale)
    precision = torch.promote_types(prediction.dtype, torch.float32)
    return (prediction.to(precision) - target.to(precision)).pow(2).mean()


def esd_target(model, x_t: Tensor, timesteps: Tensor, condition: Tensor, empty: Tensor, eta: float) -> Tensor:
    """ESD's target (Gandikota et al. 2023) at x_t: the starting model's prediction guided away from the
    concept, eps0(x_t, "") - eta (eps0(x_t, c) - eps0(x_t, "")), with `condition` the concept prompts'
    embeddings and `empty` the empty prompt's (one row, expanded). No gradient."""
    with torch.no_grad():
        unconditional = model.denoise(None, x_t, timesteps, empty.expand(len(x_t), -1, -1))
        conditional = model.denoise(None, x_t, timesteps, condition)
        return unconditional - eta * (conditional - unconditional)


def guided(prediction: Tensor, scale: float) -> Tensor:
    """uncond + scale (cond - uncond) from a prediction whose first half is conditional and second half
    unconditional (the order `distillation_loss` stacks them in)."""
    cond, uncond = prediction.chunk(2)
    return uncond + scale * (cond - uncond)


def rollout_loss(
    model,
    params: dict[str, Tensor] | None,
    start: Tensor,
    target: Tensor,
    prompts: list[str],
    scheduler,
    first_step: int,
    count: int,
    guidance_scale: float,
) -> Tensor:
    """How far `params`'s own guided sampler drifts from a recorded trajectory: from the states `start`
    at step `first_step` of `scheduler` (timesteps already set), take `count` classifier-free-guided
    steps under `params` (differentiable through every one) and compare with `target`, the states the
    recording model reached `count` steps later.

    The squared distance is divided by the square of how far the steps move the state per unit of the
    noise prediction, so it reads in the units of a noise-prediction distillation: a drift of the guided
    prediction by a constant d at every step scores exactly d^2. (The sampler's step must be linear in
    the state and the prediction, as DDIM without clipping is.)"""
    timesteps = scheduler.timesteps[first_step : first_step + count]
    if len(timesteps) != count:
        raise DiffImmuneError(
            f"a rollout of {count} steps from step {first_step} runs past the sampler's "
            f"{len(scheduler.timesteps)} steps"
        )
    condition = model.encode_prompts([*prompts, *([""] * len(prompts))], params)
    state, unit = start, torch.zeros_like(start[:1])
    for t in timesteps:
        # where a prediction off by 1 at every step so far has moved the state (the step is linear)
        unit = scheduler.step(torch.ones_like(unit), t, unit, return_dict=False)[0]
        model_input = scheduler.scale_model_input(torch.cat([state, state]), t)
        prediction = guided(model.denoise(params, model_input, t, condition), guidance_scale)
        state = scheduler.step(prediction, t, state, return_dict=False)[0]
    precision = torch.promote_types(state.dtype, torch.float32)
    reach = float(unit.mean())
    return (state.to(precision) - target.to(precision)).pow(2).mean() / reach**2
