"""GIFT on the fast world: it trains exactly its selection and reloads from its run folder, its
representation-noising term pulls target activations towards noise (and beta=0 turns it off), its hooks
never outlive a step, its unrolled gradient is the true gradient through the preservation step, the same
config and seed give the same delta, and the CLI writes a delta or fails in one line naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffimmune.cli import app
from diffimmune.data.sources import model_world
from diffimmune.errors import DiffImmuneError
from diffimmune.methods.common import (
    ANCHOR_STATES,
    INNER_PREFIX,
    RETAIN_STATE_SEED,
    Context,
    ImmunizeConfig,
    immunize,
    method_registry,
    record_sampler_states,
)
from diffimmune.methods.gift import _fixed_draws
from diffimmune.models.diffusion_model import load_model
from diffimmune.models.params import select_parameters

runner = CliRunner()

SMALL = {"steps": 2, "batch_size": 2, "num_images": 4, "reg_prompts": 16, "checkpoint_every": 1}


def gift_config(concepts=("star", "square"), **overrides):
    return ImmunizeConfig(
        method="gift", concepts=[f"world:shape={c}" for c in concepts], **{**SMALL, **overrides}
    )


def make_gift(model, config, folder):
    return method_registry()["gift"](Context(model, config, folder, model_world(model)))


def released(method):
    named = method.model.named_parameters()
    return {n: named[n].detach().clone() for n in method.theta_names}


@pytest.mark.parametrize("selection", [None, "attn"])
def test_gift_changes_only_its_selection_and_reloads_from_the_run_folder(world_model, tmp_path, selection):
    before = {n: t.detach().clone() for n, t in world_model.named_parameters().items()}
    config = gift_config(selection=selection)
    run = immunize(world_model, config, tmp_path / "run", progress=False, world=model_world(world_model))
    after = world_model.named_parameters()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    selected = set(select_parameters(world_model, selection or "xattn"))
    assert changed and changed <= selected
    assert changed == set(run.changed)
    assert len(changed) >= len(selected) // 2
    manifest = json.loads((run.delta_dir / "manifest.json").read_text())
    assert manifest["method"] == "gift"
    reloaded = load_model(tmp_path / "run")
    for name in changed:
        assert torch.equal(reloaded.named_parameters()[name], after[name])


def mean_mmd_to_noise(model, folder):
    """The representation term on fixed target batches and noise draws, at the model's own weights."""
    method = make_gift(model, gift_config(("star",), batch_size=4, num_images=8), folder)
    generator = torch.Generator().manual_seed(123)
    theta = released(method)
    values = []
    with torch.no_grad():
        for index in range(4):
            batch = method.context.batch(method.context.concepts[0], generator, with_prior=False)
            batch = _fixed_draws(model, batch, generator)
            values.append(method.upper_terms(theta, batch, seed=1000 + index)[1].item())
    return sum(values) / len(values)


def test_representation_noising_pulls_target_activations_towards_noise(fast_world, tmp_path):
    model_dir, world = fast_world[1].model_dir, None
    start = mean_mmd_to_noise(load_model(model_dir), tmp_path / "measure")
    end = {}
    for beta in (10.0, 0.0):
        model = load_model(model_dir)
        world = world or model_world(model)
        config = gift_config(
            ("star",), steps=5, batch_size=4, num_images=8, learning_rate=1e-3, beta=beta,
            hypergradient="first_order",
        )  # fmt: skip
        immunize(model, config, tmp_path / f"beta{beta}", progress=False, world=world)
        end[beta] = mean_mmd_to_noise(model, tmp_path / "measure")
    assert end[10.0] < start - 0.01, (start, end)
    assert end[10.0] < end[0.0] - 0.01, (start, end)  # the term, not the loss ascent, moved them


def test_beta_zero_turns_representation_noising_off(world_model, tmp_path):
    steps = {}
    for beta in (1.0, 0.0):
        method = make_gift(world_model, gift_config(beta=beta), tmp_path / str(beta))
        steps[beta] = method.step(released(method), 0, torch.Generator().manual_seed(7))
    assert "mmd" in steps[1.0].metrics and "mmd" not in steps[0.0].metrics
    assert steps[1.0].metrics["target_loss"] == pytest.approx(steps[0.0].metrics["target_loss"])
    difference = [(steps[1.0].grads[n] - steps[0.0].grads[n]).norm() for n in steps[0.0].grads]
    assert max(difference) > 1e-6  # the representation term has a gradient of its own


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_one_pass_over_every_concept_matches_a_pass_per_concept(world_model, tmp_path, beta, monkeypatch):
    """The multi-concept upper terms read in one denoiser pass equal one pass per concept: each
    concept's loss, its representation-noising distance and the gradient of their sum."""
    method = make_gift(world_model, gift_config(("star", "square", "triangle"), beta=beta), tmp_path)
    generator = torch.Generator().manual_seed(11)
    batches = []
    for index, concept in enumerate(method.context.concepts):
        batch = method.context.batch(concept, generator, with_prior=False)
        batches.append((_fixed_draws(world_model, batch, generator), 500 + index))
    theta = {n: v.requires_grad_(True) for n, v in released(method).items()}
    apart = [method.upper_terms(theta, batch, seed) for batch, seed in batches]

    def one_concept_pass(*args, **kwargs):
        raise AssertionError("fell back to one pass per concept")

    monkeypatch.setattr(method, "upper_terms", one_concept_pass)
    joined = method.concept_terms(theta, batches)
    assert len(joined) == len(apart) == 3
    for (loss, distance), (loss_apart, distance_apart) in zip(joined, apart, strict=True):
        assert loss.item() == pytest.approx(loss_apart.item(), rel=1e-4)
        if beta == 0:
            assert distance is None and distance_apart is None
        else:
            assert distance.item() == pytest.approx(distance_apart.item(), rel=1e-4)

    def gradient(terms):
        total = sum(-loss + beta * (distance if distance is not None else 0.0) for loss, distance in terms)
        return torch.autograd.grad(total, list(theta.values()))

    for a, b in zip(gradient(joined), gradient(apart), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6 * max(1.0, b.abs().max().item()))
    # the step's upper loss reads the same one pass
    record = {}
    method.upper_loss(theta, batches, record)
    assert record["target_loss"] == pytest.approx(sum(t[0].item() for t in apart) / 3, rel=1e-4)


def test_no_hook_is_left_on_the_denoiser_after_a_step(world_model, tmp_path):
    method = make_gift(world_model, gift_config(hypergradient="unrolled"), tmp_path)
    assert method.noise_modules
    output = method.step(released(method), 0, torch.Generator().manual_seed(3))
    assert output.metrics["mmd"] > 0
    for name, module in world_model.unet.named_modules():
        assert not module._forward_hooks, f"hook left on {name!r}"


def test_the_preservation_step_is_written_into_the_released_weights(world_model, tmp_path):
    method = make_gift(world_model, gift_config(inner_learning_rate=1e-2), tmp_path)
    params = released(method)
    start = {n: v.clone() for n, v in params.items()}
    method.step(params, 0, torch.Generator().manual_seed(5))
    assert any(not torch.equal(params[n], start[n]) for n in params)


def test_a_distilling_preservation_step_leaves_the_starting_weights_alone(world_model, tmp_path):
    # Distillation of the starting model is exactly zero, with a zero gradient, at its own weights; the
    # diffusion loss's preservation step moves them (the test above).
    method = make_gift(world_model, gift_config(inner_learning_rate=1e-2, retain_loss="distill"), tmp_path)
    params = released(method)
    start = {n: v.clone() for n, v in params.items()}
    output = method.step(params, 0, torch.Generator().manual_seed(5))
    assert output.metrics["safe_loss"] == 0.0
    assert all(torch.equal(params[n], start[n]) for n in params)
    assert any(g.abs().sum() > 0 for g in output.grads.values())  # the upper level still acts


def test_unrolled_gradient_matches_central_finite_differences(world_model, tmp_path):
    for module in (world_model.unet, world_model.text_encoder, world_model.vae):
        module.to(torch.float64)
    # beta 0: the MMD's median bandwidth is held fixed on purpose (core.mmd), which differences would see.
    config = gift_config(("star",), batch_size=1, num_images=2, beta=0.0, inner_learning_rate=0.5)
    method = make_gift(world_model, config, tmp_path)
    theta = released(method)

    def upper_value(values):
        # The step writes the preserved weights back into its input: give it a copy.
        copy = {n: v.clone() for n, v in values.items()}
        return method.step(copy, 0, torch.Generator().manual_seed(11)).loss

    output = method.step({n: v.clone() for n, v in theta.items()}, 0, torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(3)
    direction = {n: torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in theta.items()}
    analytic = sum((output.grads[n] * direction[n]).sum() for n in theta).item()
    epsilon = 1e-5
    plus = upper_value({n: theta[n] + epsilon * direction[n] for n in theta})
    minus = upper_value({n: theta[n] - epsilon * direction[n] for n in theta})
    numeric = (plus - minus) / (2 * epsilon)
    assert abs(analytic - numeric) / abs(numeric) < 1e-3, (analytic, numeric)


def test_same_config_and_seed_give_the_same_delta(fast_world, tmp_path):
    model_dir = fast_world[1].model_dir
    config = gift_config(steps=3)
    runs = []
    for name in ("a", "b"):
        model = load_model(model_dir)
        runs.append(immunize(model, config, tmp_path / name, progress=False, world=model_world(model)))
    a, b = (load_model(run.out_dir).named_parameters() for run in runs)
    assert runs[0].changed == runs[1].changed and runs[0].changed
    for name in runs[0].changed:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("anchor", [False, True])
def test_a_killed_run_resumes_to_the_same_delta(assert_resumes_exactly, anchor):
    if anchor:  # killed after step 3, between the refreshes at steps 2 and 4: the refreshed states carry
        config = gift_config(steps=4, anchor_weight=5.0, anchor_refresh=2, retain_sampler_steps=3)
        assert_resumes_exactly(config, killed_at=3)
    else:
        assert_resumes_exactly(gift_config(steps=4), killed_at=2)


def test_a_noise_layer_pattern_matching_no_module_is_an_error_naming_the_field(world_model, tmp_path):
    with pytest.raises(DiffImmuneError) as caught:
        make_gift(world_model, gift_config(noise_layers=["mid_block", "middle_block"]), tmp_path)
    message = str(caught.value)
    assert "noise_layers" in message and "middle_block" in message and "\n" not in message
    # With representation noising off the patterns are never used, so they are not checked.
    make_gift(world_model, gift_config(noise_layers=["middle_block"], beta=0.0), tmp_path)


def test_cli_immunize_gift_writes_a_delta(fast_world, tmp_path):
    model_dir = fast_world[1].model_dir
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["immunize", "--model", str(model_dir), "--method", "gift", "--concepts", "star,square",
         "--steps", "2", "--beta", "0.5", "--hypergradient", "first_order", "--anchor-weight", "2",
         "--anchor-refresh", "1", "--anchor-selection", "xattn", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "delta" / "manifest.json").read_text())
    assert manifest["method"] == "gift" and manifest["hyperparameters"]["beta"] == 0.5
    assert manifest["hyperparameters"]["anchor_weight"] == 2.0
    assert manifest["hyperparameters"]["anchor_refresh"] == 1
    assert manifest["hyperparameters"]["anchor_selection"] == "xattn"
    assert (out / "anchor_states.safetensors").is_file()
    immunized, original = load_model(out), load_model(model_dir)
    changed = [
        n
        for n, t in immunized.named_parameters().items()
        if not torch.equal(t, original.named_parameters()[n])
    ]
    assert changed and set(changed) <= set(select_parameters(original, "xattn"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"noise_layers": ["down_blocks.*", "nowhere"]}, "noise_layers"),
        ({"mmd_bandwidths": [1.0, -2.0]}, "mmd_bandwidths"),
        ({"beta": -1}, "beta"),
    ],
)
def test_cli_bad_gift_settings_are_one_line(fast_world, tmp_path, settings, message):
    import yaml

    config = tmp_path / "gift.yaml"
    config.write_text(yaml.safe_dump({"method": "gift", "concepts": ["world:shape=star"], **settings}))
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["immunize", "--model", str(fast_world[1].model_dir), "--config", str(config), "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (out / "delta").exists()


def test_a_concept_past_max_loss_is_no_longer_ascended(world_model, tmp_path):
    config = gift_config(beta=0.0, max_loss=1e-6)  # every target loss exceeds it
    method = make_gift(world_model, config, tmp_path)
    output = method.step(released(method), 0, torch.Generator().manual_seed(2))
    assert output.metrics["target_loss"] > 1e-6
    assert all(torch.count_nonzero(grad) == 0 for grad in output.grads.values())


def test_retain_weight_adds_the_safe_loss_to_the_upper_objective(world_model, tmp_path):
    # beta 0 and every target past max_loss: the upper gradient is the retain term's alone, so it is zero
    # without it (the test above) and scales exactly with its weight.
    grads, metrics = {}, {}
    for weight in (2.0, 4.0):
        config = gift_config(beta=0.0, max_loss=1e-6, retain_weight=weight)
        method = make_gift(world_model, config, tmp_path / str(weight))
        output = method.step(released(method), 0, torch.Generator().manual_seed(2))
        grads[weight], metrics[weight] = output.grads, output.metrics
    assert metrics[2.0]["retain_loss"] > 0
    assert metrics[2.0]["retain_loss"] == pytest.approx(metrics[4.0]["retain_loss"])
    assert any(g.abs().sum() > 0 for g in grads[2.0].values())
    for name, grad in grads[2.0].items():
        torch.testing.assert_close(grads[4.0][name], 2 * grad, rtol=1e-4, atol=1e-8)


def test_retain_unconditional_adds_the_empty_prompt_to_the_safe_batches(world_model, tmp_path):
    plain = make_gift(world_model, gift_config(retain_loss="distill"), tmp_path / "plain")
    method = make_gift(
        world_model, gift_config(retain_loss="distill", retain_unconditional=True), tmp_path / "u"
    )
    batch = method.safe_batch(torch.Generator().manual_seed(0))
    reference = plain.safe_batch(torch.Generator().manual_seed(0))
    count = len(reference)
    assert batch.prompts == [*reference.prompts, *([""] * count)]
    assert torch.equal(batch.x0[:count], reference.x0) and torch.equal(batch.x0[count:], reference.x0)


def test_the_anchor_pool_is_the_starting_models_sampler_on_the_target_prompts(world_model, tmp_path):
    config = gift_config(anchor_weight=1.0, retain_sampler_steps=4, negative_guidance=0.0)
    method = make_gift(world_model, config, tmp_path)
    prompts = [p for concept in method.context.concepts for p in concept.prompts]
    assert method.anchor.pool.prompts == [p for p in prompts for _ in range(4)]
    assert (tmp_path / "anchor_states.safetensors").is_file()
    batch = method.anchor.pool.batch(4, torch.Generator().manual_seed(0), None, 0.0)
    # At eta 0 the anchor pulls the target prompt's prediction to the empty prompt's.
    model = world_model
    with torch.no_grad():
        conditional = model.denoise(None, batch.x0, batch.timesteps, model.encode_prompts(batch.prompts))
        empty = model.denoise(None, batch.x0, batch.timesteps, model.encode_prompts([""] * len(batch)))
    start = released(method)
    expected = (conditional.float() - empty.float()).pow(2).mean().item()
    assert expected > 0
    assert method.anchor.loss(start, batch).item() == pytest.approx(expected, rel=1e-4)
    # eta 1 guides the target further away: (1 + eta)^2 times the distance at the starting weights.
    away = make_gift(world_model, config.model_copy(update={"negative_guidance": 1.0}), tmp_path)
    assert away.anchor.loss(start, batch).item() == pytest.approx(4 * expected, rel=1e-4)
    # Off by default, and refused for a method that does not read it.
    assert make_gift(world_model, gift_config(), tmp_path / "off").anchor is None
    with pytest.raises(ValueError, match="anchor_weight is read by .*gift"):
        ImmunizeConfig(method="esd", concepts=["world:shape=star"], anchor_weight=1.0)
    with pytest.raises(ValueError, match="set anchor_weight"):
        gift_config(negative_guidance=0.0)


def test_the_anchor_pulls_the_target_prompt_to_the_erasure_target_where_the_sampler_goes(anchor_distance):
    # GIFT's own terms (loss ascent on target images, preservation) leave the target prompt's predictions
    # at the starting model's sampler states far from ESD's erasure target; the anchor term brings them
    # measurably closer.
    distance = {}
    for weight in (0.0, 50.0):
        config = gift_config(
            concepts=("star",),
            steps=6,
            beta=0.0,
            max_loss=None,
            learning_rate=1e-3,
            anchor_weight=weight,
            retain_sampler_steps=5,
        )
        distance[weight] = anchor_distance(config, str(weight))
    assert distance[50.0] < 0.5 * distance[0.0], distance


def test_anchor_refresh_re_records_the_states_from_the_trained_weights(world_model, tmp_path):
    config = gift_config(anchor_weight=1.0, anchor_refresh=3, retain_sampler_steps=4)
    method = make_gift(world_model, config, tmp_path)
    start = method.anchor.pool.x0.clone()
    assert set(method.inner_state()) == {ANCHOR_STATES}
    theta = released(method)
    moved = {
        n: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
        for n, v in theta.items()
    }
    params = {**moved, INNER_PREFIX + ANCHOR_STATES: start.clone()}
    method.anchor.refresh(params, 4, moved)  # between refreshes: the carried states stay
    assert torch.equal(method.anchor.pool.x0, start)
    method.anchor.refresh(params, 3, moved)
    count = len(method.anchor.prompts)
    seeds = [RETAIN_STATE_SEED + count + i for i in range(count)]
    expected, _ = record_sampler_states(world_model, method.anchor.prompts, seeds, 4, 4.0, params=moved)
    assert torch.equal(method.anchor.pool.x0, expected.to(start))
    assert torch.equal(params[INNER_PREFIX + ANCHOR_STATES], method.anchor.pool.x0)
    # The same noise under the starting weights gives other states: the trained model's sampler is read.
    unmoved, _ = record_sampler_states(world_model, method.anchor.prompts, seeds, 4, 4.0)
    assert not torch.allclose(unmoved.to(start), method.anchor.pool.x0, atol=1e-3)
    # Off without the anchor, and carried nothing when not refreshing.
    assert make_gift(world_model, gift_config(anchor_weight=1.0), tmp_path / "fixed").inner_state() == {}
    with pytest.raises(ValueError, match="set anchor_weight"):
        gift_config(anchor_refresh=2)


def test_anchor_selection_lets_the_anchor_reach_only_its_tensors(world_model, tmp_path):
    # beta 0, no retain term and every target past max_loss: the upper gradient is the anchor's alone
    # (first order: unrolled, the preservation step's Hessian carries it on to other tensors, by design).
    grads = {}
    for limit in (None, "xattn"):
        config = gift_config(
            selection="attn",
            beta=0.0,
            max_loss=1e-6,
            anchor_weight=5.0,
            anchor_selection=limit,
            retain_sampler_steps=3,
            hypergradient="first_order",
        )
        method = make_gift(world_model, config, tmp_path / str(limit))
        grads[limit] = method.step(released(method), 0, torch.Generator().manual_seed(2)).grads
    cross = set(select_parameters(world_model, "xattn"))
    assert any(grads[None][n].abs().sum() > 0 for n in grads[None] if n not in cross)
    for name, grad in grads["xattn"].items():
        if name in cross:
            torch.testing.assert_close(grad, grads[None][name], rtol=1e-4, atol=1e-8)
        else:
            assert torch.count_nonzero(grad) == 0, name
    assert any(grads["xattn"][n].abs().sum() > 0 for n in cross)


def test_anchor_selection_outside_the_trained_tensors_is_an_error(world_model, tmp_path):
    with pytest.raises(DiffImmuneError, match="anchor_selection text_encoder picks none"):
        make_gift(world_model, gift_config(anchor_weight=1.0, anchor_selection="text_encoder"), tmp_path)
    with pytest.raises(ValueError, match="anchor_selection 'cross' is not a parameter selection"):
        gift_config(anchor_weight=1.0, anchor_selection="cross")
    with pytest.raises(ValueError, match="set anchor_weight"):
        gift_config(anchor_selection="xattn")
