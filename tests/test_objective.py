"""The diffusion objective: equal to the module's own loss, with the same gradients, and twice
differentiable through the UNet."""

from __future__ import annotations

import torch

from diffimmune.core.objective import (
    Batch,
    batch_losses,
    diffusion_loss,
    distillation_loss,
    math_attention,
    second_order,
    with_null_prompts,
)
from diffimmune.models.params import select_parameters
from diffimmune.models.tiny import build_tiny_pipeline


def make_batch(model, count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, model.image_size, model.image_size, generator=generator)
    prompts = ["a red star", "a blue circle", "a green square", "a photo of a dog"][:count]
    return Batch(x0=model.encode_images(images), prompts=prompts)


def module_loss(model, batch, seed):
    """The loss written out by hand with the modules' own forward (no functional_call)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.x0.shape, generator=generator)
    timesteps = torch.randint(
        0, model.scheduler.config.num_train_timesteps, (len(batch),), generator=generator
    )
    x_t = model.scheduler.add_noise(batch.x0, noise, timesteps)
    ids = model.tokenizer(
        batch.prompts, padding="max_length", max_length=8, truncation=True, return_tensors="pt"
    ).input_ids
    prediction = model.unet(x_t, timesteps, encoder_hidden_states=model.text_encoder(ids)[0]).sample
    target = (
        noise
        if model.prediction_type == "epsilon"
        else model.scheduler.get_velocity(batch.x0, noise, timesteps)
    )
    return ((prediction - target) ** 2).flatten(1).mean(1).mean()


def test_loss_equals_the_module_computed_loss(tiny_model):
    batch = make_batch(tiny_model)
    params = select_parameters(tiny_model, "unet")
    ours = diffusion_loss(tiny_model, params, batch, torch.Generator().manual_seed(5))
    assert torch.allclose(ours, module_loss(tiny_model, batch, 5), rtol=1e-6)


def test_v_prediction_targets_the_velocity():
    from diffimmune.models.diffusion_model import DiffusionModel

    model = DiffusionModel.from_pipeline(build_tiny_pipeline(prediction_type="v_prediction"))
    batch = make_batch(model)
    ours = diffusion_loss(model, None, batch, torch.Generator().manual_seed(1))
    assert model.prediction_type == "v_prediction"
    assert torch.allclose(ours, module_loss(model, batch, 1), rtol=1e-6)


def test_functional_gradients_equal_backward_gradients(tiny_model):
    batch = make_batch(tiny_model)
    params = select_parameters(tiny_model, "attn")
    for tensor in params.values():
        tensor.requires_grad_(True)
    loss = diffusion_loss(tiny_model, params, batch, torch.Generator().manual_seed(2))
    functional = torch.autograd.grad(loss, list(params.values()))
    module_loss(tiny_model, batch, 2).backward()
    for (name, tensor), grad in zip(params.items(), functional, strict=True):
        assert torch.allclose(grad, tensor.grad, rtol=1e-5, atol=1e-8), name


def test_replaced_parameters_change_the_loss_and_the_model_stays_untouched(tiny_model):
    batch = make_batch(tiny_model)
    params = select_parameters(tiny_model, "xattn_kv")
    # A random perturbation: a constant shift would vanish against layer-normed (zero-mean) embeddings.
    shifted = {n: t + 0.3 * torch.randn_like(t) for n, t in params.items()}
    original = {n: t.clone() for n, t in params.items()}
    base = diffusion_loss(tiny_model, params, batch, torch.Generator().manual_seed(3))
    moved = diffusion_loss(tiny_model, shifted, batch, torch.Generator().manual_seed(3))
    assert not torch.isclose(base, moved)
    assert all(torch.equal(original[n], t) for n, t in params.items())


def test_distillation_is_zero_at_the_models_own_weights_and_pulls_back_to_them(tiny_model):
    batch = make_batch(tiny_model)
    params = {n: t.detach().clone() for n, t in select_parameters(tiny_model, "attn").items()}
    at_start = distillation_loss(tiny_model, params, batch, torch.Generator().manual_seed(6))
    assert at_start.item() == 0.0
    moved = {n: (t + 0.05 * torch.randn_like(t)).requires_grad_(True) for n, t in params.items()}
    loss = distillation_loss(tiny_model, moved, batch, torch.Generator().manual_seed(6))
    assert loss.item() > 0
    grads = torch.autograd.grad(loss, list(moved.values()))
    # A short step down the gradient lowers the distance.
    stepped = {n: (t - 0.1 * g).detach() for (n, t), g in zip(moved.items(), grads, strict=True)}
    assert distillation_loss(tiny_model, stepped, batch, torch.Generator().manual_seed(6)) < loss
    # Unlike the diffusion loss, which is not zero at the model's own weights.
    assert diffusion_loss(tiny_model, params, batch, torch.Generator().manual_seed(6)).item() > 0


def test_prior_preservation_adds_the_weighted_prior_loss(tiny_model):
    instance = make_batch(tiny_model, 2, seed=0)
    prior = make_batch(tiny_model, 2, seed=1)
    generator = torch.Generator().manual_seed(4)
    noise = [torch.randn(instance.x0.shape, generator=generator) for _ in range(2)]
    steps = [torch.tensor([10, 500]), torch.tensor([900, 200])]
    fixed_instance = Batch(instance.x0, instance.prompts, noise=noise[0], timesteps=steps[0])
    fixed_prior = Batch(prior.x0, prior.prompts, noise=noise[1], timesteps=steps[1])
    joined = Batch(
        instance.x0, instance.prompts, prior=fixed_prior, prior_weight=0.5, noise=noise[0], timesteps=steps[0]
    )
    expected = diffusion_loss(tiny_model, None, fixed_instance) + 0.5 * diffusion_loss(
        tiny_model, None, fixed_prior
    )
    assert torch.allclose(diffusion_loss(tiny_model, None, joined), expected, rtol=1e-5)


def test_hessian_vector_product_through_the_unet_matches_finite_differences(tiny_model):
    tiny_model.unet.double()
    tiny_model.text_encoder.double()
    batch = make_batch(tiny_model)
    batch = Batch(batch.x0.double(), batch.prompts)
    params = {
        n: t.detach().clone().requires_grad_(True) for n, t in select_parameters(tiny_model, "xattn").items()
    }
    vector = {n: torch.randn_like(t) for n, t in params.items()}

    def gradient(values):
        loss = diffusion_loss(tiny_model, values, batch, torch.Generator().manual_seed(9))
        return torch.autograd.grad(loss, list(values.values()), create_graph=True)

    with math_attention():
        grads = gradient(params)
        dot = sum((g * vector[n]).sum() for g, n in zip(grads, params, strict=True))
        hvp = torch.autograd.grad(dot, list(params.values()))
        epsilon = 1e-5
        plus = gradient({n: t + epsilon * vector[n] for n, t in params.items()})
        minus = gradient({n: t - epsilon * vector[n] for n, t in params.items()})
    finite = [(p - m) / (2 * epsilon) for p, m in zip(plus, minus, strict=True)]
    flat_hvp = torch.cat([h.flatten() for h in hvp])
    flat_finite = torch.cat([f.flatten() for f in finite])
    assert flat_hvp.norm() > 0
    assert (flat_hvp - flat_finite).norm() / flat_finite.norm() < 1e-6


def test_second_order_convolution_keeps_values_and_both_derivatives_and_skips_the_frozen_weight():
    """Under `second_order` a frozen-weight convolution (strided, dilated, grouped, an odd input the
    stride does not divide) gives the same output, gradient and second derivative as PyTorch's own, and
    its double backward runs no weight-gradient convolution; a trainable weight keeps the usual path."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2).double().requires_grad_(False)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 6, 4, 4, dtype=torch.float64)

    def derivatives():
        output = conv(x)
        (grad,) = torch.autograd.grad((torch.tanh(output) * probe).sum(), x, create_graph=True)
        (second,) = torch.autograd.grad((grad * grad).sum(), x)
        return output, grad, second

    reference = derivatives()
    with second_order(), torch.profiler.profile() as profile:
        lean = derivatives()
    for ours, theirs in zip(lean, reference, strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    assert reference[2].abs().max() > 0
    names = {event.name for event in profile.events()}
    assert "aten::_convolution_double_backward" not in names
    with torch.profiler.profile() as native:
        derivatives()
    assert "aten::_convolution_double_backward" in {event.name for event in native.events()}
    # A trainable weight is not rerouted: it gets its gradient under second_order too.
    conv.weight.requires_grad_(True)
    with second_order():
        (weight_grad,) = torch.autograd.grad(conv(x).sum(), conv.weight)
    assert weight_grad.abs().sum() > 0
    assert torch.nn.Conv2d._conv_forward.__qualname__ == "Conv2d._conv_forward"  # restored on exit


def test_null_prompt_batch_pairs_each_sample_with_the_empty_prompt(tiny_model):
    batch = make_batch(tiny_model, count=2)
    batch.prior = make_batch(tiny_model, count=2, seed=1)
    doubled = with_null_prompts(tiny_model, batch, torch.Generator().manual_seed(3))
    assert doubled.prompts == [*batch.prompts, "", ""]
    assert doubled.prior is batch.prior
    assert torch.equal(doubled.noise[:2], doubled.noise[2:])
    assert torch.equal(doubled.timesteps[:2], doubled.timesteps[2:])
    # Its loss is the mean of the conditional and the unconditional losses on the same noisy samples.
    parts = [
        Batch(x0=batch.x0, prompts=prompts, noise=doubled.noise[:2], timesteps=doubled.timesteps[:2])
        for prompts in (batch.prompts, ["", ""])
    ]
    params = {n: t.detach() + 0.01 for n, t in select_parameters(tiny_model, "attn").items()}
    doubled.prior = None
    both = distillation_loss(tiny_model, params, doubled)
    conditional, unconditional = (distillation_loss(tiny_model, params, part) for part in parts)
    assert torch.allclose(both, (conditional + unconditional) / 2, rtol=1e-5)
    assert not torch.allclose(conditional, unconditional, rtol=1e-3)


def test_guided_distillation_compares_the_predictions_the_sampler_steps_with(tiny_model):
    batch = make_batch(tiny_model, count=2)
    generator = torch.Generator().manual_seed(4)
    batch.noise = torch.randn(batch.x0.shape, generator=generator)
    batch.timesteps = torch.tensor([100, 700])
    params = {n: t.detach() + 0.01 for n, t in select_parameters(tiny_model, "attn").items()}
    x_t = tiny_model.scheduler.add_noise(batch.x0, batch.noise, batch.timesteps)

    def guided_by_hand(values, scale):
        cond = tiny_model.denoise(
            values, x_t, batch.timesteps, tiny_model.encode_prompts(batch.prompts, values)
        )
        uncond = tiny_model.denoise(values, x_t, batch.timesteps, tiny_model.encode_prompts(["", ""], values))
        return uncond + scale * (cond - uncond)

    for scale in (1.0, 4.0):
        expected = (guided_by_hand(params, scale) - guided_by_hand(None, scale)).pow(2).mean()
        found = distillation_loss(tiny_model, params, batch, guidance_scale=scale)
        assert torch.allclose(found, expected, rtol=1e-5), scale
    # Scale 1 is the conditional distillation; at 4 the guided drift is not the halves' drift.
    plain = distillation_loss(tiny_model, params, batch)
    assert torch.allclose(distillation_loss(tiny_model, params, batch, guidance_scale=1.0), plain, rtol=1e-5)
    assert not torch.allclose(
        distillation_loss(tiny_model, params, batch, guidance_scale=4.0), plain, rtol=1e-2
    )


def test_batch_losses_equal_the_separate_losses_and_draw_the_same_noise(tiny_model):
    batches = [make_batch(tiny_model, count, seed) for count, seed in ((2, 0), (3, 1), (1, 2))]
    params = {n: v.detach().requires_grad_(True) for n, v in select_parameters(tiny_model, "attn").items()}
    separate_generator, joined_generator = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    separate = [diffusion_loss(tiny_model, params, b, separate_generator) for b in batches]
    joined = batch_losses(tiny_model, params, batches, joined_generator)
    assert len(joined) == 3
    for a, b in zip(separate, joined, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # The generator is left where the separate calls leave it: what is drawn next is the same.
    assert torch.equal(torch.rand(4, generator=separate_generator), torch.rand(4, generator=joined_generator))
    # And so is the gradient of a weighted sum of the terms (each term keeps its own graph).
    tensors = list(params.values())
    weights = (1.0, -2.0, 0.5)
    first = torch.autograd.grad(sum(w * t for w, t in zip(weights, separate, strict=True)), tensors)
    second = torch.autograd.grad(sum(w * t for w, t in zip(weights, joined, strict=True)), tensors)
    for a, b in zip(first, second, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
