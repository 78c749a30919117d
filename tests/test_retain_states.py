"""Retain states from the starting model's own sampler (`retain_states: sampler`): the pool holds exactly
the consecutive states of each guided DDIM trajectory, the distillation loss reads them as they are,
every retain loss draws from them, and settings that cannot use them are refused in one line."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from pydantic import ValidationError

from diffimmune.core.objective import Batch, diffusion_loss, distillation_loss, with_null_prompts
from diffimmune.data.sources import model_world
from diffimmune.errors import DiffImmuneError
from diffimmune.methods.common import (
    RETAIN_STATE_SEED,
    Context,
    ImmunizeConfig,
    immunize,
    method_registry,
    sampler_states,
)
from diffimmune.models.diffusion_model import load_model

SMALL = {"steps": 2, "batch_size": 2, "num_images": 4, "reg_prompts": 3, "retain_sampler_steps": 4}


def config(**overrides):
    settings = {"retain_loss": "distill", "retain_states": "sampler", **SMALL}
    return ImmunizeConfig(method="gift", concepts=["world:shape=star"], **{**settings, **overrides})


def guided(model, x, t, prompts, scale):
    with torch.no_grad():
        condition = model.encode_prompts(prompts)
        empty = model.encode_prompts([""] * len(prompts))
        uncond = model.denoise(None, x, t, empty)
        cond = model.denoise(None, x, t, condition)
    return uncond + scale * (cond - uncond)


def test_the_pool_is_each_prompts_trajectory_state_by_state(world_model, tmp_path):
    settings = config(retain_guidance_scale=3.0)
    prompts = ["a red circle", "a blue square"]
    pool = sampler_states(world_model, "kept", prompts, settings, tmp_path / "states.safetensors")
    steps = settings.retain_sampler_steps
    assert len(pool.x0) == len(pool.prompts) == len(pool.timesteps) == len(prompts) * steps
    assert pool.prompts == [p for p in prompts for _ in range(steps)]
    scheduler = world_model.make_sampler("ddim")
    scheduler.set_timesteps(steps)
    for index, prompt in enumerate(prompts):
        states = pool.x0[index * steps : (index + 1) * steps]
        times = pool.timesteps[index * steps : (index + 1) * steps]
        assert torch.equal(times, scheduler.timesteps.long())
        noise = world_model.initial_noise([RETAIN_STATE_SEED + index]) * scheduler.init_noise_sigma
        torch.testing.assert_close(states[:1], noise)
        # Each state is the sampler's step from the one before, under the guided prediction.
        for k in range(steps - 1):
            prediction = guided(world_model, states[k : k + 1], times[k], [prompt], 3.0)
            following = scheduler.step(prediction, times[k], states[k : k + 1], return_dict=False)[0]
            torch.testing.assert_close(states[k + 1 : k + 2], following, rtol=1e-4, atol=1e-5)


def test_the_pool_is_cached_for_the_same_settings_only(world_model, tmp_path):
    cache = tmp_path / "states.safetensors"
    first = sampler_states(world_model, "kept", ["a red circle"], config(), cache)
    with mock.patch.object(type(world_model), "sample", side_effect=AssertionError("sampled again")):
        again = sampler_states(world_model, "kept", ["a red circle"], config(), cache)
    assert torch.equal(first.x0, again.x0) and torch.equal(first.timesteps, again.timesteps)
    other = sampler_states(world_model, "kept", ["a red circle"], config(retain_sampler_steps=3), cache)
    assert len(other.x0) == 3


def test_distillation_reads_a_noisy_batch_at_its_own_states(world_model, tmp_path):
    pool = sampler_states(
        world_model, "kept", ["a red circle", "a star"], config(), tmp_path / "s.safetensors"
    )
    batch = pool.batch(3, torch.Generator().manual_seed(0), None, 1.0)
    assert batch.noisy
    assert distillation_loss(world_model, None, batch).item() == 0.0  # the starting model keeps itself
    named = world_model.named_parameters()
    moved = {n: t + 0.01 for n, t in named.items() if "attn2.to_k" in n}
    loss = distillation_loss(world_model, moved, batch, torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = world_model.denoise(
            None, batch.x0, batch.timesteps, world_model.encode_prompts(batch.prompts)
        )
        after = world_model.denoise(
            moved, batch.x0, batch.timesteps, world_model.encode_prompts(batch.prompts, moved)
        )
    assert loss.item() > 0
    torch.testing.assert_close(loss, (after - before).pow(2).mean())
    # The empty-prompt copy keeps the same states.
    doubled = with_null_prompts(world_model, batch, torch.Generator().manual_seed(1))
    assert doubled.noisy and torch.equal(doubled.x0[: len(batch)], doubled.x0[len(batch) :])
    with pytest.raises(DiffImmuneError, match="needs clean images, not sampler states"):
        diffusion_loss(world_model, None, batch)
    with pytest.raises(DiffImmuneError, match="needs the timesteps"):
        Batch(batch.x0, batch.prompts, noisy=True)


@pytest.mark.parametrize("method", ["gift", "imma", "resalign"])
def test_every_retain_loss_draws_the_sampler_states(world_model, tmp_path, method):
    extra = {"retain_weight": 1.0}
    if method == "resalign":
        extra |= {"finetune_steps": (1, 1), "richardson_steps": 1, "finetune_methods": ["lora"]}
    settings = ImmunizeConfig(
        method=method,
        concepts=["world:shape=star"],
        retain_loss="distill",
        retain_states="sampler",
        hypergradient="first_order",
        **SMALL,
        **extra,
    )
    context = Context(world_model, settings, tmp_path, model_world(world_model))
    assert context.retain.timesteps is None  # the images stay (fine-tune data, merge prompts)
    assert len(context.retain_pool.x0) == len(context.retain.x0) * SMALL["retain_sampler_steps"]
    assert (tmp_path / "retain_states.safetensors").is_file()
    method_object = method_registry()[method](context)
    drawn = []
    original = Context.batch

    def spy(self, concept, generator, with_prior=True):
        batch = original(self, concept, generator, with_prior)
        drawn.append((concept is self.retain_pool, batch.noisy))
        return batch

    named = world_model.named_parameters()
    params = {n: named[n].detach().clone().requires_grad_(True) for n in method_object.theta_names}
    params |= {f"inner.{k}": v.clone().requires_grad_(True) for k, v in method_object.inner_state().items()}
    with mock.patch.object(Context, "batch", spy):
        output = method_object.step(params, 0, torch.Generator().manual_seed(0))
    assert (True, True) in drawn
    assert (True, False) not in drawn
    assert all(torch.isfinite(g).all() for g in output.grads.values())


def test_a_sampler_state_run_differs_from_noised_images_and_resumes_exactly(
    world_model, fast_world, tmp_path
):
    world = model_world(world_model)
    model_dir = fast_world[1].model_dir
    settings = config(steps=4, checkpoint_every=2, retain_weight=5.0)
    straight = immunize(load_model(model_dir), settings, tmp_path / "straight", progress=False, world=world)
    immunize(load_model(model_dir), config(steps=2, checkpoint_every=2, retain_weight=5.0), tmp_path / "killed",
             progress=False, world=world)  # fmt: skip
    resumed = immunize(load_model(model_dir), settings, tmp_path / "killed", progress=False, world=world)
    noised = immunize(
        load_model(model_dir),
        config(steps=4, checkpoint_every=2, retain_weight=5.0, retain_states="noised"),
        tmp_path / "noised",
        progress=False,
        world=world,
    )
    a = load_model(straight.out_dir).named_parameters()
    b = load_model(resumed.out_dir).named_parameters()
    c = load_model(noised.out_dir).named_parameters()
    assert straight.changed
    for name in straight.changed:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], c[name]) for name in straight.changed)


def test_sampler_states_need_distillation():
    with pytest.raises(ValidationError, match="retain_states sampler needs retain_loss distill"):
        config(retain_loss="diffusion")
    # ResAlign always distils.
    ImmunizeConfig(method="resalign", concepts=["world:shape=star"], retain_states="sampler")


def rollout_config(**overrides):
    settings = {"retain_loss": "rollout", "retain_states": "sampler", "retain_rollout_steps": 2, **SMALL}
    return ImmunizeConfig(method="imma", concepts=["world:shape=star"], **{**settings, **overrides})


def test_a_rollout_draw_is_two_states_of_one_trajectory_apart(world_model, tmp_path):
    context = Context(world_model, rollout_config(), tmp_path, model_world(world_model))
    pool = context.retain_pool
    sampler = world_model.make_sampler("ddim")
    sampler.set_timesteps(4)
    firsts = set()
    for seed in range(6):
        start, target, prompts, first = context.rollout_draw(torch.Generator().manual_seed(seed))
        firsts.add(first)
        assert 0 <= first <= 1 and len(prompts) == len(start) == len(target) == 2
        for state, later, prompt in zip(start, target, prompts, strict=True):
            row = next(i for i in range(len(pool.x0)) if torch.equal(pool.x0[i], state))
            assert pool.prompts[row] == prompt and torch.equal(pool.x0[row + 2], later)
            assert pool.timesteps[row] == sampler.timesteps[first]
            assert pool.timesteps[row + 2] == sampler.timesteps[first + 2]
    assert firsts == {0, 1}


def test_the_rollout_loss_is_zero_on_the_recorded_model_and_a_constant_drift_squared(world_model, tmp_path):
    from diffimmune.core.objective import rollout_loss

    context = Context(world_model, rollout_config(), tmp_path, model_world(world_model))
    start, target, prompts, first = context.rollout_draw(torch.Generator().manual_seed(0))
    sampler = world_model.make_sampler("ddim")
    sampler.set_timesteps(4)

    def loss():
        return rollout_loss(world_model, None, start, target, prompts, sampler, first, 2, 4.0)

    # The starting model retraces its own trajectory (to float error, against states of order 1).
    assert loss().item() < 1e-8
    # A prediction off by d at every step scores d^2. The predictor is made state-free (zero, then d) so
    # that the drift does not feed back: the sampler alone carries it to the end.
    reached = start
    for t in sampler.timesteps[first : first + 2]:
        reached = sampler.step(torch.zeros_like(reached), t, reached, return_dict=False)[0]
    with mock.patch.object(world_model, "denoise", side_effect=lambda p, x, *a: torch.zeros_like(x) + 0.05):
        drifted = rollout_loss(world_model, None, start, reached, prompts, sampler, first, 2, 4.0)
    assert drifted.item() == pytest.approx(0.05**2, rel=1e-4)
    with pytest.raises(DiffImmuneError, match="runs past the sampler's 4 steps"):
        rollout_loss(world_model, None, start, target, prompts, sampler, 3, 2, 4.0)


def test_a_rollout_retain_run_differs_from_one_step_distillation_and_resumes_exactly(
    world_model, fast_world, tmp_path
):
    world = model_world(world_model)
    model_dir = fast_world[1].model_dir
    settings = {"steps": 4, "checkpoint_every": 2, "retain_weight": 50.0}

    def run(folder, **overrides):
        chosen = rollout_config(**{**settings, **overrides})
        return immunize(load_model(model_dir), chosen, tmp_path / folder, progress=False, world=world)

    straight = run("straight")
    run("killed", steps=2)
    resumed = run("killed")
    one_step = run("one-step", retain_loss="guided")
    a, b, c = (load_model(r.out_dir).named_parameters() for r in (straight, resumed, one_step))
    assert straight.changed
    for name in straight.changed:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], c[name]) for name in straight.changed)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"retain_states": "noised"}, "set retain_states sampler"),
        ({"retain_sampling": "hard"}, "keep retain_sampling uniform"),
        ({"retain_rollout_steps": 4}, "must be under retain_sampler_steps"),
        ({"retain_unconditional": True}, "remove retain_unconditional"),
    ],
)
def test_rollout_settings_that_cannot_run_are_refused(overrides, message):
    with pytest.raises(ValidationError, match=message):
        rollout_config(**overrides)
    with pytest.raises(ValidationError, match="retain_loss rollout is the bi-level methods'"):
        config(retain_loss="rollout")
