"""Immunization methods (IMMA, MIMA, Joint, Compose, ESD): each trains exactly its selection on the fast
world, the unrolled hypergradient is the true gradient of the bi-level objective (central finite
differences in float64), a killed run resumes to the same result, and the CLI writes a delta and an
exported folder that diffusers reloads."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffimmune.cli import app
from diffimmune.data.sources import model_world
from diffimmune.methods.common import (
    IMMUNIZE_FIELDS_ADDED,
    Context,
    ImmunizeConfig,
    immunize,
    method_registry,
)
from diffimmune.models.diffusion_model import load_model
from diffimmune.models.params import select_parameters

runner = CliRunner()

SMALL = {
    "steps": 2,
    "batch_size": 2,
    "num_images": 4,
    "num_class_images": 2,
    "reg_prompts": 16,
    "checkpoint_every": 1,
}
SELECTIONS = {"imma": "attn", "mima": "xattn", "joint": "xattn", "compose": "xattn_kv", "esd": "xattn"}


def small_config(method, concepts=("star", "square"), **overrides):
    if method == "imma":
        concepts = concepts[:1]
    return ImmunizeConfig(
        method=method, concepts=[f"world:shape={c}" for c in concepts], **{**SMALL, **overrides}
    )


@pytest.mark.parametrize("method", sorted(SELECTIONS))
def test_each_method_changes_only_its_selection(world_model, tmp_path, method):
    before = {n: t.detach().clone() for n, t in world_model.named_parameters().items()}
    run = immunize(
        world_model, small_config(method), tmp_path / method, progress=False, world=model_world(world_model)
    )
    after = world_model.named_parameters()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    selected = set(select_parameters(world_model, SELECTIONS[method]))
    assert changed, f"{method} changed nothing"
    assert changed <= selected
    assert changed == set(run.changed)
    # Most of the selection moves (biases the loss never reaches may stay).
    assert len(changed) >= len(selected) // 2
    reloaded = load_model(tmp_path / method)  # the run folder loads as the immunized model
    for name in changed:
        assert torch.equal(reloaded.named_parameters()[name], after[name])


def float64_model(world_model):
    for module in (world_model.unet, world_model.text_encoder, world_model.vae):
        module.to(torch.float64)
    return world_model


def outer_value(method, params, seed):
    """The bi-level objective (the upper loss after adaptation) as the step computes it, with its draws
    fixed by the seed; StepOutput.loss is its negation (the loop minimises)."""
    generator = torch.Generator().manual_seed(seed)
    # The step stores the adversary's new state into params (warm start): give it a copy.
    return -method.step({k: v.clone() for k, v in params.items()}, 0, generator).loss


@pytest.mark.parametrize(
    ("method_name", "overrides"),
    [
        ("imma", {"inner_steps": 2}),
        ("mima", {"inner_learning_rate": 1e-2}),
        ("mima", {"inner_method": "lora", "inner_learning_rate": 1e-2}),  # a LoRA adversary per concept
        ("mima", {"inner_method": "lora", "inner_learning_rate": 1e-2, "merge_others": "sum"}),
        # the merged model's loss plus each adversary's own adapted model's loss on its concept
        ("mima", {"inner_method": "lora", "inner_learning_rate": 1e-2, "outer_models": "merged_and_adapted"}),
        # Adam adversaries: the graph runs through the moments of the step's own inner steps
        ("mima", {"inner_method": "lora", "inner_optimizer": "adam", "inner_steps": 2}),
        # one adversary of each kind, each scored on its own adapted model, each at its own step size
        ("imma", {"inner_method": ["lora", "dreambooth"], "inner_learning_rate": [1e-1, 1e-2]}),
    ],
)
def test_unrolled_hypergradient_matches_central_finite_differences(
    world_model, tmp_path, method_name, overrides
):
    model = float64_model(world_model)
    config = small_config(method_name, batch_size=1, num_images=2, **overrides)
    context = Context(model, config, tmp_path, model_world(model))
    method = method_registry()[method_name](context)
    named = model.named_parameters()
    theta = {n: named[n].detach().clone() for n in method.theta_names}
    inner = {f"inner.{k}": v.to(torch.float64) for k, v in method.inner_state().items()}
    # A warm-started adversary: a non-zero residual, so the adapted weights differ from the released ones.
    generator = torch.Generator().manual_seed(3)
    inner = {k: 1e-2 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in inner.items()}
    # An Adam adversary's carried state: two earlier steps, a second moment of the gradients' square's scale.
    inner = {k: 1e-3 * v.square() if "adam_second:" in k else v for k, v in inner.items()}
    inner = {k: torch.full_like(v, 2.0) if k.endswith("adam_count") else v for k, v in inner.items()}
    params = {**theta, **inner}
    output = method.step({k: v.clone() for k, v in params.items()}, 0, torch.Generator().manual_seed(11))
    direction = {n: torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in theta.items()}
    analytic = -sum((output.grads[n] * direction[n]).sum() for n in theta).item()
    # Adam's normalised step bends sharply where a gradient is small: its difference quotient needs a
    # smaller step (at 1e-5 it is 2.6% off, at 1e-6 0.03%, at 1e-7 3e-6).
    epsilon = 1e-7 if config.inner_optimizer == "adam" else 1e-5
    plus = {**params, **{n: theta[n] + epsilon * direction[n] for n in theta}}
    minus = {**params, **{n: theta[n] - epsilon * direction[n] for n in theta}}
    numeric = (outer_value(method, plus, 11) - outer_value(method, minus, 11)) / (2 * epsilon)
    assert abs(analytic - numeric) / abs(numeric) < 1e-3, (analytic, numeric)


@pytest.mark.parametrize("mode", ["first_order", "unrolled"])
@pytest.mark.parametrize(
    ("outer_models", "scored"),
    # merged: the merged model on both concepts; then each adversary's own model on its concept only
    [("merged", [2]), ("merged_and_adapted", [2, 1, 1]), ("adapted", [1, 1])],
)
def test_mima_outer_models_score_the_merged_and_each_adversarys_own_model(
    world_model, tmp_path, mode, outer_models, scored
):
    config = small_config("mima", inner_method="lora", hypergradient=mode, outer_models=outer_models)
    context = Context(world_model, config, tmp_path, model_world(world_model))
    method = method_registry()["mima"](context)
    calls = []
    score = method.outer_loss

    def recording(params, batches, generator, terms=None):
        value = score(params, batches, generator, terms)
        calls.append((params, batches, value.item()))
        return value

    method.outer_loss = recording
    named = world_model.named_parameters()
    params = {n: named[n].detach().clone().requires_grad_(True) for n in method.theta_names}
    params |= {f"inner.{k}": v.requires_grad_(True) for k, v in method.inner_state().items()}
    output = method.step(params, 0, torch.Generator().manual_seed(5))
    assert [len(batches) for _, batches, _ in calls] == scored
    own = [call for call in calls if len(call[1]) == 1]
    if own:
        (first, first_batches, _), (second, second_batches, _) = own
        assert first_batches[0].prompts != second_batches[0].prompts  # each on its own concept
        kv = method.kv_names[0]
        assert not torch.allclose(first[kv], second[kv])  # two different adversaries
    assert output.loss == pytest.approx(-sum(value for *_, value in calls), rel=1e-6)
    assert output.metrics["target_loss"] == pytest.approx(-output.loss / sum(scored), rel=1e-6)
    if len(scored) > 1 and outer_models != "merged":  # each view's mean beside the overall one
        own_metrics = {k: v for k, v in output.metrics.items() if k.startswith("target_loss_own_")}
        assert sorted(own_metrics) == ["target_loss_own_square", "target_loss_own_star"]
        assert own_metrics["target_loss_own_star"] == pytest.approx(calls[-2][2], rel=1e-6)


@pytest.mark.parametrize("method_name", ["imma", "mima"])
def test_several_adversary_kinds_each_train_at_their_own_rate_and_are_scored_on_their_own_model(
    world_model, tmp_path, method_name
):
    world = model_world(world_model)
    kinds = ["lora", "dreambooth"]
    concepts = ["star"] if method_name == "imma" else ["star", "square"]
    residuals = []
    for rates in ([0.5, 1e-2], [1.0, 1e-2]):  # the LoRA adversary's rate doubles, DreamBooth's stays
        overrides = {"outer_models": "adapted"} if method_name == "mima" else {}
        config = small_config(
            method_name, concepts, inner_method=kinds, inner_learning_rate=rates, hypergradient="first_order",
            **overrides,
        )  # fmt: skip
        method = method_registry()[method_name](Context(world_model, config, tmp_path, world))
        assert [(b.label, b.lr) for b in method.branches] == (
            list(zip(kinds, rates, strict=True))
            if method_name == "imma"
            else [(f"{c}_{k}", r) for c in concepts for k, r in zip(kinds, rates, strict=True)]
        )
        named = world_model.named_parameters()
        params = {n: named[n].detach().clone().requires_grad_(True) for n in method.theta_names}
        params |= {f"inner.{k}": v for k, v in method.inner_state().items()}
        output = method.step(params, 0, torch.Generator().manual_seed(5))
        own = sorted(k for k in output.metrics if k.startswith("target_loss_own_"))
        assert own == sorted(f"target_loss_own_{b.label}" for b in method.branches)
        residuals.append({k[len("inner.") :]: v.clone() for k, v in params.items() if k.startswith("inner.")})
    # One step from a zero residual is -rate * gradient: each branch moved by its own rate only.
    for key in residuals[0]:
        branch = method.branches[int(key.split("/")[0])]
        first, second = residuals[0][key], residuals[1][key]
        if not first.abs().sum():
            continue  # e.g. LoRA's A: B = 0 gives it no gradient on the first step
        scale = 2.0 if branch.label.endswith("lora") else 1.0
        torch.testing.assert_close(second, scale * first, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "mima", "inner_method": ["lora", "dreambooth"]}, "need outer_models adapted"),
        ({"method": "compose", "inner_method": ["lora", "full"]}, "give it one inner_method"),
        ({"method": "imma", "inner_method": ["lora", "lora"]}, "names an adapter twice"),
        ({"method": "imma", "inner_method": []}, "empty list"),
        (
            {"method": "imma", "inner_method": ["lora", "full"], "inner_learning_rate": [1e-3]},
            "1 entries for 2",
        ),
        ({"method": "imma", "inner_learning_rate": [1e-3, 1e-4]}, "2 entries for 1"),
    ],
)
def test_adversary_lists_that_cannot_run_are_refused(overrides, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        ImmunizeConfig(concepts=["world:shape=star"], **overrides)


def test_target_metrics_report_each_view_and_the_terms_still_pushing():
    from diffimmune.methods.bilevel import target_metrics

    metrics = target_metrics({"merged": [0.9, 0.5], "own_star": [0.1], "own_square": [0.2]}, max_loss=0.3)
    assert metrics["target_loss"] == pytest.approx(0.425)
    assert metrics["target_loss_merged"] == pytest.approx(0.7)
    assert metrics["target_loss_own_star"] == pytest.approx(0.1)
    assert metrics["target_active"] == pytest.approx(0.5)  # the two own terms, not the merged ones
    assert target_metrics({"model": [0.1, 0.5]}, max_loss=None) == {"target_loss": pytest.approx(0.3)}


@pytest.mark.parametrize(("max_loss", "taken"), [(1e3, 1), (1e-6, 3)])
@pytest.mark.parametrize("mode", ["first_order", "unrolled"])
def test_catch_up_steps_the_adversaries_until_their_loss_is_within_max_loss(
    world_model, tmp_path, mode, max_loss, taken
):
    world = model_world(world_model)
    states = {}
    for catch_up in (0, 3):
        config = small_config(
            "mima", inner_method="lora", inner_optimizer="adam", outer_models="adapted", hypergradient=mode,
            max_loss=max_loss, inner_catch_up=catch_up,
        )  # fmt: skip
        method = method_registry()["mima"](Context(world_model, config, tmp_path, world))
        named = world_model.named_parameters()
        params = {n: named[n].detach().clone().requires_grad_(True) for n in method.theta_names}
        params |= {f"inner.{k}": v for k, v in method.inner_state().items()}
        output = method.step(params, 0, torch.Generator().manual_seed(5))
        states[catch_up] = {k: v.clone() for k, v in params.items() if k.startswith("inner.")}
        if catch_up:
            # Within a loose bound the first extra step finds every adversary there; under a tight one
            # the adversaries take every step allowed.
            assert output.metrics["inner_catch_up"] == taken
        else:
            assert "inner_catch_up" not in output.metrics
    # The Adam step count carried by the adversaries counts the extra steps beside the outer step's own.
    assert states[0]["inner.adam_count"].item() == 1
    assert states[3]["inner.adam_count"].item() == 1 + taken
    moved = [k for k in states[0] if "/" in k and states[0][k].abs().sum() > 0]
    assert moved and any(not torch.equal(states[0][k], states[3][k]) for k in moved)


@pytest.mark.parametrize("mode", ["first_order", "unrolled"])
def test_restart_starts_the_carried_adversaries_again_from_the_released_weights(world_model, tmp_path, mode):
    world = model_world(world_model)
    config = small_config(
        "mima", inner_method="lora", inner_optimizer="adam", outer_models="adapted", hypergradient=mode,
        inner_restart=2,
    )  # fmt: skip
    method = method_registry()["mima"](Context(world_model, config, tmp_path, world))
    named = world_model.named_parameters()
    theta = {n: named[n].detach().clone().requires_grad_(True) for n in method.theta_names}
    fresh = {f"inner.{k}": v for k, v in method.inner_state().items()}
    params = theta | {k: v.clone() for k, v in fresh.items()}
    for step in (0, 1):  # two steps grow the adversaries: their Adam count reads 2
        method.step(params, step, torch.Generator().manual_seed(step))
    assert params["inner.adam_count"].item() == 2
    carried = {k: v.clone() for k, v in params.items() if k.startswith("inner.")}
    restarted = method.step(params, 2, torch.Generator().manual_seed(9))
    # Step 2 is a restart: what it does equals a step from fresh adversaries on the same released weights ...
    again = theta | {k: v.clone() for k, v in fresh.items()}
    from_fresh = method.step(again, 2, torch.Generator().manual_seed(9))
    assert params["inner.adam_count"].item() == 1
    for key in fresh:
        torch.testing.assert_close(params[key], again[key], rtol=0, atol=0)
    assert restarted.loss == pytest.approx(from_fresh.loss, rel=1e-6)
    # ... and not what the grown adversaries do (step 3 is not a restart: they carry on).
    grown = theta | carried
    method.step(grown, 3, torch.Generator().manual_seed(9))
    assert grown["inner.adam_count"].item() == 3
    moved = [k for k in fresh if "/" in k and again[k].abs().sum() > 0]
    assert moved and any(not torch.equal(grown[k], again[k]) for k in moved)


def test_restart_needs_carried_adversaries():
    from pydantic import ValidationError

    with pytest.raises(
        ValidationError, match="inner_restart restarts adversaries .* set inner_warm_start true"
    ):
        ImmunizeConfig(method="mima", concepts=["world:shape=star"], inner_restart=5, inner_warm_start=False)
    with pytest.raises(ValidationError, match="inner_restart is read by .*, not by gift"):
        ImmunizeConfig(method="gift", concepts=["world:shape=star"], inner_restart=5)


def test_average_from_releases_the_mean_of_the_iterates_after_it(fast_world, tmp_path):
    model_dir = fast_world[1].model_dir
    runs = {}
    for steps, average_from in ((2, None), (3, None), (4, None), (4, 1)):
        config = small_config("imma", hypergradient="first_order", steps=steps, average_from=average_from)
        model = load_model(model_dir)
        world = model_world(model)
        out = tmp_path / f"t{steps}_{average_from}"
        runs[steps, average_from] = immunize(model, config, out, progress=False, world=world)
    released = {key: load_model(run.out_dir).named_parameters() for key, run in runs.items()}
    names = runs[4, None].changed
    assert names
    # The three runs without averaging are one trajectory stopped at steps 2, 3 and 4 (constant lr,
    # per-step data); averaging from step 1 releases the mean of those three iterates.
    for name in names:
        mean = sum(released[steps, None][name] for steps in (2, 3, 4)) / 3
        torch.testing.assert_close(released[4, 1][name], mean, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(released[4, 1][n], released[4, None][n]) for n in names)


def test_average_from_that_leaves_nothing_to_average_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="average_from 200 leaves no step of 200 to average"):
        ImmunizeConfig(method="mima", concepts=["world:shape=star"], average_from=200)
    with pytest.raises(ValidationError, match="average_from is read by .*, not by resalign"):
        ImmunizeConfig(method="resalign", concepts=["world:shape=star"], average_from=100)


def test_catch_up_without_a_loss_bound_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="inner_catch_up steps the adversaries .* set max_loss"):
        ImmunizeConfig(method="mima", concepts=["world:shape=star"], inner_catch_up=5)
    with pytest.raises(ValidationError, match="inner_catch_up is read by .*, not by gift"):
        ImmunizeConfig(method="gift", concepts=["world:shape=star"], inner_catch_up=5, max_loss=0.3)


def test_first_order_differs_from_unrolled_but_points_the_same_way(world_model, tmp_path):
    world = model_world(world_model)
    grads = {}
    for mode in ("first_order", "unrolled"):
        config = small_config("imma", hypergradient=mode, batch_size=2)
        context = Context(world_model, config, tmp_path / mode, world)
        method = method_registry()["imma"](context)
        named = world_model.named_parameters()
        params = {n: named[n].detach().clone() for n in method.theta_names}
        params |= {f"inner.{k}": v for k, v in method.inner_state().items()}
        output = method.step(params, 0, torch.Generator().manual_seed(5))
        grads[mode] = torch.cat([output.grads[n].flatten() for n in method.theta_names])
    cosine = torch.nn.functional.cosine_similarity(grads["first_order"], grads["unrolled"], dim=0).item()
    assert not torch.allclose(grads["first_order"], grads["unrolled"])
    assert cosine > 0.5


@pytest.mark.parametrize("retain_loss", ["diffusion", "distill"])
def test_the_retain_loss_is_the_configured_one(world_model, tmp_path, retain_loss):
    config = small_config("imma", retain_weight=1.0, retain_loss=retain_loss)
    context = Context(world_model, config, tmp_path, model_world(world_model))
    method = method_registry()["imma"](context)
    named = world_model.named_parameters()
    # As the training loop hands them over: leaves that require grad.
    params = {n: named[n].detach().clone().requires_grad_(True) for n in method.theta_names}
    params |= {f"inner.{k}": v.requires_grad_(True) for k, v in method.inner_state().items()}
    retained = method.step(params, 0, torch.Generator().manual_seed(5)).metrics["retain_loss"]
    # Distillation of the starting model is exactly zero at its own weights; the diffusion loss is not.
    assert (retained == 0.0) == (retain_loss == "distill")


def moved_method(world_model, config, tmp_path):
    """(context, method, released weights moved a little off the model's) for `config`."""
    context = Context(world_model, config, tmp_path, model_world(world_model))
    method = method_registry()[config.method](context)
    named = world_model.named_parameters()
    generator = torch.Generator().manual_seed(0)
    theta = {
        n: named[n].detach() + 0.02 * torch.randn(named[n].shape, generator=generator)
        for n in method.theta_names
    }
    return context, method, theta


@pytest.mark.parametrize("method_name", ["imma", "resalign"])
def test_retain_unconditional_also_distils_the_empty_prompt_predictions(world_model, tmp_path, method_name):
    from diffimmune.core.objective import Batch, distillation_loss, sample_noise_and_timesteps

    config = small_config(method_name, retain_weight=1.0, retain_loss="distill", retain_unconditional=True)
    context, method, theta = moved_method(world_model, config, tmp_path)
    loss = method.retain_loss(theta, torch.Generator().manual_seed(7))
    # The same draws by hand: the retain batch, then one noise and timestep per image for both prompts.
    generator = torch.Generator().manual_seed(7)
    batch = context.batch(context.retain, generator, with_prior=False)
    noise, timesteps = sample_noise_and_timesteps(world_model, batch, generator)
    parts = [
        distillation_loss(world_model, theta, Batch(batch.x0, prompts, noise=noise, timesteps=timesteps))
        for prompts in (batch.prompts, [""] * len(batch))
    ]
    assert torch.allclose(loss, (parts[0] + parts[1]) / 2, rtol=1e-5)
    assert parts[1] > 0 and not torch.allclose(parts[0], parts[1], rtol=1e-2)


@pytest.mark.parametrize("method_name", ["imma", "gift", "resalign"])
def test_retain_loss_guided_distils_the_guided_predictions(world_model, tmp_path, method_name):
    from diffimmune.core.objective import distillation_loss, sample_noise_and_timesteps

    config = small_config(method_name, retain_weight=1.0, retain_loss="guided", retain_guidance_scale=3.0)
    context, method, theta = moved_method(world_model, config, tmp_path)
    generator = torch.Generator().manual_seed(1)
    batch = context.batch(context.retain, torch.Generator().manual_seed(7), with_prior=False)
    batch.noise = torch.randn(batch.x0.shape, generator=generator)
    batch.timesteps = torch.randint(0, 1000, (len(batch),), generator=generator)
    if method_name == "gift":  # its preservation step reads the safe batch it is handed
        loss = method.safe_loss(theta, batch)
    else:  # the method's own draw, replayed by hand below
        loss = method.retain_loss(theta, torch.Generator().manual_seed(7))
        replay = torch.Generator().manual_seed(7)
        batch = context.batch(context.retain, replay, with_prior=False)
        if method_name == "resalign":
            batch = method.fixed_draws(batch, replay)
        batch.noise, batch.timesteps = sample_noise_and_timesteps(world_model, batch, replay)
    expected = distillation_loss(world_model, theta, batch, guidance_scale=3.0)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert not torch.allclose(loss, distillation_loss(world_model, theta, batch), rtol=1e-2)


def test_retain_loss_guided_refuses_a_second_unconditional_term():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="remove retain_unconditional"):
        small_config("imma", retain_loss="guided", retain_unconditional=True)
    assert (
        small_config("imma", retain_loss="guided", retain_states="sampler").retain_distill_guidance() == 4.0
    )
    assert small_config("imma", retain_loss="distill").retain_distill_guidance() is None


def test_a_folder_of_another_immunization_is_never_resumed_as_this_one(world_model, fast_world, tmp_path):
    import json

    from diffimmune.errors import DiffImmuneError

    world = model_world(world_model)
    model_dir = fast_world[1].model_dir
    first = small_config("imma", steps=2)
    immunize(load_model(model_dir), first, tmp_path / "run", progress=False, world=world)
    # A record written before the later fields existed reads them at their old values and still resumes.
    record_path = tmp_path / "run" / "immunize.json"
    record = json.loads(record_path.read_text())
    for added in IMMUNIZE_FIELDS_ADDED:
        del record["config"][added]
    record_path.write_text(json.dumps(record))
    immunize(load_model(model_dir), first, tmp_path / "run", progress=False, world=world)
    changed = small_config("imma", steps=2, learning_rate=1e-3, retain_loss="distill", retain_weight=1.0)
    with pytest.raises(
        DiffImmuneError, match=r"other settings \(learning_rate, retain_loss, retain_weight\)"
    ):
        immunize(load_model(model_dir), changed, tmp_path / "run", progress=False, world=world)
    # Without resume the folder is replaced: trained anew under the new settings.
    run = immunize(
        load_model(model_dir), changed, tmp_path / "run", resume=False, progress=False, world=world
    )
    assert json.loads(record_path.read_text())["config"]["learning_rate"] == 1e-3
    fresh = immunize(load_model(model_dir), changed, tmp_path / "fresh", progress=False, world=world)
    replaced, expected = (
        load_model(run.out_dir).named_parameters(),
        load_model(fresh.out_dir).named_parameters(),
    )
    assert all(torch.equal(replaced[n], expected[n]) for n in fresh.changed)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"inner_method": "lora", "inner_optimizer": "adam"},
        # killed between the anchor's refreshes at steps 2 and 4: the refreshed states carry
        {"inner_method": "lora", "anchor_weight": 5.0, "anchor_refresh": 2, "retain_sampler_steps": 3},
        # killed inside the averaged steps: the running mean carries
        {"inner_method": "lora", "average_from": 1},
    ],
)
def test_a_killed_run_resumes_to_the_same_delta(assert_resumes_exactly, overrides):
    # Killed after step 2: its checkpoint holds the weights and the adversaries' state.
    assert_resumes_exactly(small_config("mima", steps=4, checkpoint_every=1, **overrides), killed_at=2)


def test_cli_immunize_writes_a_delta_and_an_export_that_diffusers_loads(fast_world, tmp_path):
    from diffusers import DiffusionPipeline

    model_dir = fast_world[1].model_dir
    out, export = tmp_path / "run", tmp_path / "export"
    result = runner.invoke(
        app,
        [
            "immunize", "--model", str(model_dir), "--method", "imma", "--concepts", "star",
            "--steps", "2", "--hypergradient", "first_order", "--out", str(out), "--export", str(export),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "delta" / "manifest.json").is_file()
    pipeline = DiffusionPipeline.from_pretrained(export)
    immunized = load_model(out)
    for name, tensor in immunized.unet.named_parameters():
        assert torch.equal(tensor, dict(pipeline.unet.named_parameters())[name])
    original = load_model(model_dir)
    assert any(
        not torch.equal(t, original.named_parameters()[n]) for n, t in immunized.named_parameters().items()
    )


def cli_one_step_imma(fast_world, out, *flags: str) -> dict:
    """`diffimmune immunize` one first-order IMMA step on the star with `flags`; the run's recorded config."""
    arguments = [
        "immunize", "--model", str(fast_world[1].model_dir), "--method", "imma", "--concepts", "star",
        "--steps", "1", "--hypergradient", "first_order", *flags, "--out", str(out),
    ]  # fmt: skip
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "immunize.json").read_text())
    return record.get("config", record)


def test_cli_immunize_retain_flags_reach_the_run(fast_world, tmp_path):
    out = tmp_path / "run"
    flags = ["--retain-weight", "5", "--retain-loss", "distill", "--retain-unconditional"]
    flags += ["--retain-sampling", "hard", "--retain-states", "sampler"]
    config = cli_one_step_imma(fast_world, out, *flags)
    assert (
        config["retain_weight"] == 5.0
        and config["retain_loss"] == "distill"
        and config["retain_unconditional"]
        and config["retain_sampling"] == "hard"
        and config["retain_states"] == "sampler"
    )
    assert (out / "retain_states.safetensors").is_file()


def test_cli_immunize_retain_rollout_flags_reach_the_run(fast_world, tmp_path):
    flags = ["--retain-weight", "2", "--retain-loss", "rollout", "--retain-states", "sampler"]
    flags += ["--retain-rollout-steps", "2", "--retain-guidance-scale", "3"]
    config = cli_one_step_imma(fast_world, tmp_path / "run", *flags)
    assert config["retain_loss"] == "rollout" and config["retain_states"] == "sampler"
    assert config["retain_rollout_steps"] == 2 and config["retain_guidance_scale"] == 3.0


def test_cli_immunize_anchor_flags_reach_a_bilevel_run(fast_world, tmp_path):
    flags = ["--anchor-weight", "2", "--anchor-refresh", "1", "--anchor-selection", "xattn"]
    config = cli_one_step_imma(fast_world, tmp_path / "run", *flags)
    assert config["anchor_weight"] == 2.0 and config["anchor_refresh"] == 1
    assert config["anchor_selection"] == "xattn"
    assert (tmp_path / "run" / "anchor_states.safetensors").is_file()
    metrics = [
        json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["anchor_loss"] > 0


def test_cli_immunize_catch_up_flags_reach_the_run(fast_world, tmp_path):
    flags = ["--inner-method", "lora", "--max-loss", "0.5", "--inner-catch-up", "2"]
    config = cli_one_step_imma(fast_world, tmp_path / "run", *flags)
    assert config["max_loss"] == 0.5 and config["inner_catch_up"] == 2
    metrics = [
        json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert 1 <= metrics[-1]["inner_catch_up"] <= 2


def test_cli_immunize_restart_and_averaging_flags_reach_the_run(fast_world, tmp_path):
    flags = ["--inner-method", "lora", "--inner-restart", "3", "--average-from", "0"]
    config = cli_one_step_imma(fast_world, tmp_path / "run", *flags)
    assert config["inner_restart"] == 3 and config["average_from"] == 0


def test_cli_immunize_takes_one_adversary_of_each_kind(fast_world, tmp_path):
    out = tmp_path / "run"
    config = cli_one_step_imma(
        fast_world, out, "--inner-method", "lora,dreambooth", "--inner-learning-rate", "0.5,1e-2"
    )
    assert config["inner_method"] == ["lora", "dreambooth"] and config["inner_learning_rate"] == [0.5, 1e-2]
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert {"target_loss_own_lora", "target_loss_own_dreambooth"} <= set(metrics[-1])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--method", "nope", "--concepts", "star"], "method"),
        (["--method", "imma", "--concepts", "star", "--inner-learning-rate", "fast"], "inner_learning_rate"),
        (["--method", "imma"], "--concepts is missing"),
        (["--method", "imma", "--concepts", "unicorn"], "world has no shape 'unicorn'"),
        (["--method", "imma", "--concepts", "star", "--hypergradient", "sideways"], "hypergradient"),
        (["--method", "imma", "--concepts", "star", "--retain-loss", "sideways"], "retain_loss"),
        (["--method", "imma", "--concepts", "star", "--retain-sampling", "sideways"], "retain_sampling"),
        (
            ["--method", "gift", "--concepts", "star", "--retain-states", "sampler"],
            "needs retain_loss distill",
        ),
        (["--method", "gift", "--concepts", "star", "--inner-optimizer", "adam"], "not by gift"),
    ],
)
def test_cli_immunize_bad_input_is_one_line(fast_world, tmp_path, arguments, message):
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["immunize", "--model", str(fast_world[1].model_dir), "--out", str(out), *arguments]
    )
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (out / "delta").exists()


@pytest.mark.parametrize(
    ("method", "field", "value"),
    [
        ("imma", "outer_models", "adapted"),
        ("joint", "merge_others", "sum"),
        ("gift", "inner_method", "lora"),
        ("mima", "beta", 0.0),
        ("mima", "proximal_gamma", 0.5),
        ("resalign", "inner_warm_start", False),
        ("esd", "max_loss", 0.3),
    ],
)
def test_a_field_the_method_does_not_read_is_refused_not_ignored(method, field, value):
    from pydantic import ValidationError

    from diffimmune.methods.common import FIELD_READERS

    with pytest.raises(ValidationError, match=f"{field} is read by .*, not by {method}; remove it"):
        ImmunizeConfig(method=method, concepts=["world:shape=star"], **{field: value})
    reader = FIELD_READERS[field][0]
    ImmunizeConfig(method=reader, concepts=["world:shape=star"], **{field: value})  # its reader takes it
    # A dumped config (every field written out, at its default) still loads for every method.
    dumped = ImmunizeConfig(method=method, concepts=["world:shape=star"]).model_dump()
    assert ImmunizeConfig(**dumped).model_dump() == dumped


def test_the_anchor_pulls_mimas_target_prompts_to_the_erasure_target_where_the_sampler_goes(anchor_distance):
    # MIMA's own terms leave the target prompts' predictions at the starting model's sampler states far
    # from ESD's erasure target; with `anchor_weight` (refreshed) the released weights move measurably closer.
    distance = {}
    for weight in (0.0, 50.0):
        config = small_config(
            "mima", steps=4, learning_rate=1e-3, anchor_weight=weight, retain_sampler_steps=5,
            anchor_refresh=2 if weight else 0, inner_method="lora",
        )  # fmt: skip
        distance[weight] = anchor_distance(config, str(weight))
    assert distance[50.0] < 0.5 * distance[0.0], distance


def test_the_anchor_reads_its_erasure_target_from_anchor_reference(fast_world, tmp_path):
    # Immunizing a UCE-erased model: the erased model's own guidance for the star has lost part of its
    # direction, so ESD's target made from it is nearer its own prediction; with anchor_reference (the model
    # before the erasure) the target is exactly the base model's guided away from the star, farther away.
    from pydantic import ValidationError

    from diffimmune.core.objective import Batch, esd_target
    from diffimmune.errors import DiffImmuneError
    from diffimmune.methods.uce import UCEConfig, erase_with_uce

    base_dir = fast_world[1].model_dir
    erased = load_model(base_dir)
    erase_with_uce(erased, UCEConfig(concepts=["star"]), tmp_path / "erased")
    erased = load_model(tmp_path / "erased")
    losses, batches = {}, {}
    for reference in (None, str(base_dir)):
        config = small_config("imma", concepts=("star",), anchor_weight=1.0, retain_sampler_steps=3,
                              anchor_reference=reference)  # fmt: skip
        context = Context(erased, config, tmp_path / f"run-{reference is None}", model_world(erased))
        method = method_registry()["imma"](context)
        pool = method.anchor.pool
        batch = Batch(pool.x0, pool.prompts, timesteps=pool.timesteps, noisy=True)
        named = erased.named_parameters()
        losses[reference] = method.anchor.loss({n: named[n] for n in method.theta_names}, batch).item()
        batches[reference] = batch
    # the target is exactly the reference's ESD target at the same states
    batch = batches[str(base_dir)]
    base = load_model(base_dir)
    with torch.no_grad():
        empty = base.encode_prompts([""])
        target = esd_target(base, batch.x0, batch.timesteps, base.encode_prompts(batch.prompts), empty, 1.0)
        prediction = erased.denoise(None, batch.x0, batch.timesteps, erased.encode_prompts(batch.prompts))
    assert losses[str(base_dir)] == pytest.approx((prediction - target).pow(2).mean().item(), rel=1e-5)
    assert losses[str(base_dir)] > 1.2 * losses[None], losses  # the base's guidance still points at the star
    with pytest.raises(DiffImmuneError, match="base names an experiment's model"):
        method_on("imma", erased, tmp_path / "bad", anchor_weight=1.0, anchor_reference="base")
    with pytest.raises(
        ValidationError, match="anchor_reference makes the anchor's target and the anchor is off"
    ):
        small_config("imma", anchor_reference=str(base_dir))


def method_on(method, model, out_dir, **overrides):
    """`method` set up on `model` for the star, as the training loop would build it."""
    config = small_config(method, concepts=("star",), retain_sampler_steps=3, **overrides)
    return method_registry()[method](Context(model, config, out_dir, model_world(model)))


def test_cli_erase_esd_writes_a_loadable_run(fast_world, tmp_path):
    out = tmp_path / "esd"
    result = runner.invoke(
        app,
        ["erase", "--model", str(fast_world[1].model_dir), "--method", "esd", "--concepts", "star",
         "--steps", "2", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    erased = load_model(out)
    original = load_model(fast_world[1].model_dir)
    changed = [
        n for n, t in erased.named_parameters().items() if not torch.equal(t, original.named_parameters()[n])
    ]
    assert changed and set(changed) <= set(select_parameters(original, "xattn"))
