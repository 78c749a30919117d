"""Hard retain sampling (`retain_sampling: hard`): the retain images are re-weighted by how far the
denoiser has drifted from the starting model on them, every `retain_refresh` steps; the draws follow the
weights; a killed run resumes to the same delta; settings that could not resume exactly are refused."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from diffimmune.data.sources import model_world
from diffimmune.errors import DiffImmuneError
from diffimmune.methods.common import Context, ImmunizeConfig, immunize
from diffimmune.models.diffusion_model import load_model

SMALL = {"steps": 4, "batch_size": 2, "num_images": 4, "reg_prompts": 16, "checkpoint_every": 2}


def config(**overrides):
    settings = {"retain_loss": "distill", "retain_sampling": "hard", "retain_refresh": 2, **SMALL}
    return ImmunizeConfig(method="gift", concepts=["world:shape=star"], **{**settings, **overrides})


def released(model):
    return {n: t.detach().clone() for n, t in model.named_parameters().items() if "attn2" in n}


@pytest.mark.parametrize("retain_loss", ["distill", "guided"])
def test_the_weights_are_uniform_without_drift_and_follow_each_images_drift(
    world_model, tmp_path, retain_loss
):
    context = Context(world_model, config(retain_loss=retain_loss), tmp_path, model_world(world_model))
    count = len(context.retain.x0)
    context.refresh_retain_weights(released(world_model))
    torch.testing.assert_close(context.retain.weights, torch.full((count,), 1.0 / count))

    generator = torch.Generator().manual_seed(0)
    moved = {
        n: t + 0.05 * torch.randn(t.shape, generator=generator) for n, t in released(world_model).items()
    }
    context.refresh_retain_weights(moved)
    weights = context.retain.weights
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights.min().item() >= 0.5 / count - 1e-7  # half of every draw stays uniform
    assert weights.max().item() > 1.5 / count  # the drift is not the same everywhere
    # Each image's weight is its own drift's share: measured here one image at a time.
    x_t, timesteps, _ = context._retain_probe
    drift = []

    def prediction(params, i, prompt):
        return world_model.denoise(
            params, x_t[i : i + 1], timesteps[i : i + 1], world_model.encode_prompts([prompt], params)
        )

    with torch.no_grad():
        for i in range(count):
            prompt = context.retain.prompts[i]
            before, after = (prediction(params, i, prompt) for params in (None, moved))
            if retain_loss == "guided":  # the guided prediction at the default scale 4
                empty_before, empty_after = (prediction(params, i, "") for params in (None, moved))
                before = empty_before + 4.0 * (before - empty_before)
                after = empty_after + 4.0 * (after - empty_after)
            drift.append((after - before).pow(2).mean())
    drift = torch.stack(drift)
    expected = 0.5 / count + 0.5 * drift / drift.sum()
    torch.testing.assert_close(weights, expected, rtol=1e-3, atol=1e-6)


def test_batches_are_drawn_by_the_weights(world_model, tmp_path):
    context = Context(world_model, config(), tmp_path, model_world(world_model))
    count = len(context.retain.x0)
    context.retain.weights = torch.zeros(count)
    context.retain.weights[3] = 1.0
    batch = context.batch(context.retain, torch.Generator().manual_seed(0), with_prior=False)
    assert batch.prompts == [context.retain.prompts[3]] * len(batch)
    assert torch.equal(batch.x0, context.retain.x0[[3] * len(batch)])


def test_a_killed_hard_sampling_run_resumes_to_the_same_delta_and_differs_from_uniform(
    world_model, fast_world, tmp_path
):
    world = model_world(world_model)
    model_dir = fast_world[1].model_dir
    straight = immunize(load_model(model_dir), config(), tmp_path / "straight", progress=False, world=world)
    immunize(load_model(model_dir), config(steps=2), tmp_path / "killed", progress=False, world=world)
    resumed = immunize(load_model(model_dir), config(), tmp_path / "killed", progress=False, world=world)
    uniform = immunize(
        load_model(model_dir),
        config(retain_sampling="uniform"),
        tmp_path / "uniform",
        progress=False,
        world=world,
    )
    a = load_model(straight.out_dir).named_parameters()
    b = load_model(resumed.out_dir).named_parameters()
    c = load_model(uniform.out_dir).named_parameters()
    assert straight.changed
    for name in straight.changed:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], c[name]) for name in straight.changed)


def test_settings_that_could_not_resume_exactly_are_refused(world_model, fast_world, tmp_path):
    with pytest.raises(
        ValidationError, match="checkpoint_every \\(3\\) must be a multiple of retain_refresh"
    ):
        config(checkpoint_every=3)
    world = model_world(world_model)
    model_dir = fast_world[1].model_dir
    # 3 steps end between two drift measurements (every 2): extending the run cannot match an unbroken one.
    immunize(load_model(model_dir), config(steps=3), tmp_path / "run", progress=False, world=world)
    with pytest.raises(DiffImmuneError, match="resumes at step 3, between two drift measurements"):
        immunize(load_model(model_dir), config(steps=4), tmp_path / "run", progress=False, world=world)
