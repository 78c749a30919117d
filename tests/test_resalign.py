"""ResAlign: the Moreau-envelope hypergradient is exact on quadratics (Richardson fixed point, central
finite differences of the whole objective), the fine-tune sampler is deterministic and covers its
distribution with valid AttackConfigs, each simulated fine-tune has a fresh (correct) Adam, a diverging
solve falls back loudly and lands in metrics.jsonl, and a run on the fast world trains a LoRA on the
attention layers whose merge is exactly the delta."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from typer.testing import CliRunner

from diffimmune.cli import app
from diffimmune.config import AttackConfig
from diffimmune.core.hypergrad import ImplicitConfig, gradient_step
from diffimmune.core.train import latest_checkpoint
from diffimmune.data.sources import model_world
from diffimmune.methods.common import Context, ImmunizeConfig, immunize, method_registry
from diffimmune.methods.resalign import FinetuneOptimizer, moreau_surrogate, sample_finetunes
from diffimmune.models.diffusion_model import load_model
from diffimmune.models.params import select_parameters

DTYPE = torch.float64
SIZE, GAMMA, RELEARN = 6, 0.4, 0.7


# ----------------------------------------------------------------------------- quadratics
def _quadratic(seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(SIZE, SIZE, generator=generator, dtype=DTYPE)
    hessian = basis @ basis.T / SIZE + 0.5 * torch.eye(SIZE, dtype=DTYPE)
    hessian = hessian / torch.linalg.eigvalsh(hessian).max()
    b, c, w = (torch.randn(SIZE, generator=generator, dtype=DTYPE) for _ in range(3))
    return hessian, b, c, w


def _finetune(kind, hessian, b, c):
    """A fine-tune as ResAlign sees it. `full`: phi starts at W and the loss reads phi only; `additive`
    (LoRA-like): phi starts at 0 and the model is W + phi, so the loss reads W too."""

    def view(state, released):
        return state["phi"] if kind == "full" else released["w"] + state["phi"]

    def init_state(released):
        return {"phi": released["w"] if kind == "full" else torch.zeros_like(released["w"])}

    def inner_loss(state, released, batch):
        model = view(state, released)
        return 0.5 * model @ hessian @ model - b @ model

    def outer_loss(state, released, batch):
        return 0.5 * (view(state, released) - c).square().sum()

    def closed_form_adapted(w):
        """argmin_phi inner_loss + ||phi - phi0||^2 / (2 gamma)."""
        system = hessian + torch.eye(SIZE, dtype=DTYPE) / GAMMA
        if kind == "full":
            return torch.linalg.solve(system, b + w / GAMMA)
        return torch.linalg.solve(system, b - hessian @ w)

    return view, init_state, inner_loss, outer_loss, closed_form_adapted


def _proximal_steps(inner_loss, init_state, released):
    """Inner steps that converge to the proximal point (so phi_k = phi* to machine precision)."""
    fixed = {"w": released["w"].detach()}
    center = init_state(fixed)["phi"]

    def proximal(state, batch):
        return inner_loss(state, fixed, batch) + (state["phi"] - center).square().sum() / (2 * GAMMA)

    return gradient_step(proximal, 0.3)


def _surrogate(kind, w, implicit):
    hessian, b, c, _ = _quadratic()
    view, init_state, inner_loss, outer_loss, closed = _finetune(kind, hessian, b, c)
    released = {"w": w}
    return moreau_surrogate(
        released,
        init_state=init_state,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        inner_step=_proximal_steps(inner_loss, init_state, released),
        inner_batches=[None] * 300,
        outer_batch=None,
        implicit=implicit,
        loss_reads_released=kind != "full",
    )


EXACT = ImplicitConfig(gamma=GAMMA, iterations=300, alpha=0.6, tolerance=1e-13)


@pytest.mark.parametrize("kind", ["full", "additive"])
def test_richardson_solves_the_moreau_fixed_point_of_a_quadratic_finetune(kind):
    hessian, b, c, w = _quadratic()
    view, _, _, _, closed = _finetune(kind, hessian, b, c)
    _, result = _surrogate(kind, w, EXACT)
    phi_star = closed(w)
    assert torch.allclose(result.adapted["phi"], phi_star, atol=1e-10)
    outer_gradient = view({"phi": phi_star}, {"w": w}) - c  # d outer / d phi at phi*
    expected = torch.linalg.solve(torch.eye(SIZE, dtype=DTYPE) + GAMMA * hessian, outer_gradient)
    assert torch.allclose(result.grads["phi"], expected, atol=1e-9)
    assert not result.info["fallback"] and result.info["residual"] <= 1e-12


@pytest.mark.parametrize("kind", ["full", "additive"])
def test_hypergradient_of_the_whole_objective_matches_central_finite_differences(kind):
    """J(W) = (1 - lambda) L_h(W) + lambda L_h(phi*(W)) with phi* in closed form, against the gradient
    of (1 - lambda) L_h(W) + lambda * surrogate, the code path ResAlign's step takes."""
    hessian, b, c, w = _quadratic()
    view, _, _, _, closed = _finetune(kind, hessian, b, c)

    def objective(weights):
        before = 0.5 * (weights - c).square().sum()
        after = 0.5 * (view({"phi": closed(weights)}, {"w": weights}) - c).square().sum()
        return (1 - RELEARN) * before + RELEARN * after

    leaf = w.clone().requires_grad_(True)
    surrogate, _ = _surrogate(kind, leaf, EXACT)
    total = (1 - RELEARN) * 0.5 * (leaf - c).square().sum() + RELEARN * surrogate
    (analytic,) = torch.autograd.grad(total, leaf)
    epsilon = 1e-6
    numeric = torch.stack(
        [
            (objective(w + epsilon * e) - objective(w - epsilon * e)) / (2 * epsilon)
            for e in torch.eye(SIZE, dtype=DTYPE)
        ]
    )
    assert torch.allclose(analytic, numeric, atol=1e-7), (analytic, numeric)
    # The implicit part matters: the first-order hypergradient is a different vector.
    leaf = w.clone().requires_grad_(True)
    first_order, _ = _surrogate(kind, leaf, None)
    total = (1 - RELEARN) * 0.5 * (leaf - c).square().sum() + RELEARN * first_order
    assert not torch.allclose(torch.autograd.grad(total, leaf)[0], numeric, atol=1e-3)


def test_first_order_mode_ignores_the_dependence_of_the_finetune_on_the_weights():
    hessian, b, c, w = _quadratic()
    leaf = w.clone().requires_grad_(True)
    surrogate, _ = _surrogate("full", leaf, None)
    (gradient,) = torch.autograd.grad(surrogate, leaf)
    _, _, _, _, closed = _finetune("full", hessian, b, c)
    assert torch.allclose(gradient, closed(w) - c, atol=1e-9)  # d outer / d phi at phi*, unchanged


# ----------------------------------------------------------------------------- the simulated optimizer
def test_functional_adam_equals_torch_adam_with_bias_correction_applied_once():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(5, generator=generator, dtype=DTYPE)
    start = torch.randn(5, generator=generator, dtype=DTYPE)

    def loss_fn(state, batch):
        return (state["x"] - target).pow(4).sum()

    step = FinetuneOptimizer(loss_fn, "adam", 0.05)
    state = {"x": start.clone()}
    reference = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([reference], lr=0.05)
    for _ in range(6):
        state = {"x": state["x"].detach().requires_grad_(True)}
        state = step(state, None, create_graph=False)
        optimizer.zero_grad()
        loss_fn({"x": reference}, None).backward()
        optimizer.step()
    assert torch.allclose(state["x"], reference.detach(), atol=1e-12)


def test_gradient_clipping_matches_the_training_loop():
    def loss_fn(state, batch):
        return 100.0 * state["x"].sum()

    state = {"x": torch.zeros(4, dtype=DTYPE, requires_grad=True)}
    updated = FinetuneOptimizer(loss_fn, "sgd", 1.0, grad_clip=1.0)(state, None, create_graph=False)
    assert torch.allclose(updated["x"].norm(), torch.tensor(1.0, dtype=DTYPE), atol=1e-5)


# ----------------------------------------------------------------------------- the sampler
def _resalign_config(**overrides):
    settings = {
        "method": "resalign",
        "concepts": ["world:shape=star", "world:shape=square"],
        "steps": 3,
        "batch_size": 2,
        "num_images": 4,
        "reg_prompts": 16,
        "checkpoint_every": 1,
        "finetune_steps": (1, 2),
        "finetune_samples": 1,
        "richardson_steps": 2,
        "retain_weight": 1.0,
    }
    return ImmunizeConfig(**{**settings, **overrides})


def test_sampler_is_deterministic_and_covers_every_configured_choice():
    config = _resalign_config(finetune_samples=3, finetune_steps=(2, 9), finetune_data=["target", "retain"])
    draws = [sample_finetunes(config, step, "world:shape!=star,square", 16) for step in range(60)]
    again = [sample_finetunes(config, step, "world:shape!=star,square", 16) for step in range(60)]
    assert draws == again
    assert (
        sample_finetunes(config.model_copy(update={"seed": 1}), 0, "world:shape!=star,square", 16) != draws[0]
    )
    flat = [attack for step in draws for attack in step]
    assert all(len(step) == 3 for step in draws)
    assert {a.method for a in flat} == {"lora", "full", "dreambooth", "benign"}
    assert {a.optimizer for a in flat} == {"sgd", "adam"}
    assert {a.data for a in flat} == {*config.concepts, "world:shape!=star,square"}
    assert {a.steps for a in flat} == set(range(2, 10))
    for attack in flat:
        assert AttackConfig.model_validate(attack.model_dump()) == attack
        method = attack.method if attack.method != "benign" else attack.benign_method
        grid = config.finetune_learning_rates["lora" if method == "lora" else "full"]
        scale = config.finetune_sgd_lr_scale if attack.optimizer == "sgd" else 1.0
        assert any(abs(attack.learning_rate - rate * scale) < 1e-12 for rate in grid)
        assert 1 <= attack.num_images <= 16


def test_config_accepts_implicit_only_for_resalign():
    assert _resalign_config().hypergradient == "implicit"  # ResAlign's default
    with pytest.raises(ValueError, match="implicit"):
        ImmunizeConfig(method="imma", concepts=["world:shape=star"], hypergradient="implicit")
    with pytest.raises(ValueError, match="first_order"):
        _resalign_config(hypergradient="unrolled")
    with pytest.raises(ValueError, match="finetune_steps"):
        _resalign_config(finetune_steps=(5, 2))


# ----------------------------------------------------------------------------- on the fast world
def _method(world_model, tmp_path, **overrides):
    config = _resalign_config(**overrides)
    context = Context(world_model, config, tmp_path, model_world(world_model))
    method = method_registry()["resalign"](context)
    named = world_model.named_parameters()
    params = {n: named[n].detach().clone() for n in method.theta_names}
    params |= {f"inner.{k}": v.clone().requires_grad_(True) for k, v in method.inner_state().items()}
    return method, params


def test_each_simulated_finetune_starts_with_a_fresh_adam_state(world_model, tmp_path):
    method, params = _method(world_model, tmp_path, concepts=["world:shape=star"])
    attack = AttackConfig(
        method="lora", learning_rate=3e-3, steps=3, batch_size=2, optimizer="adam", data="world:shape=star",
        num_images=4, seed=5,
    )  # fmt: skip
    released = method.merged(method.lora_state(params))
    outer = method.harmful_batches(torch.Generator().manual_seed(1))
    runs = [method.simulate(attack, released, outer, torch.Generator().manual_seed(2))[1] for _ in range(2)]
    # Had the second run inherited the first's moments and step count, it would end elsewhere.
    for name, value in runs[0].adapted.items():
        assert torch.equal(value, runs[1].adapted[name]), name
    assert runs[0].outer_loss == runs[1].outer_loss


@pytest.mark.parametrize("harmful", ["diffusion", "esd"])
def test_the_harmful_loss_reads_every_concept_in_one_pass_as_one_pass_each_would(
    world_model, tmp_path, harmful
):
    from diffimmune.core.objective import diffusion_loss

    concepts = ["world:shape=star", "world:shape=square", "world:shape=triangle"]
    method, params = _method(world_model, tmp_path, concepts=concepts, harmful_loss=harmful, max_loss=0.3)
    merged = method.merged(method.lora_state(params))
    batches = method.harmful_batches(torch.Generator().manual_seed(4))
    calls = []
    denoise = method.model.denoise
    method.model.denoise = lambda *a, **k: calls.append(1) or denoise(*a, **k)
    capped: list[bool] = []
    try:
        joined = method.harmful_loss(merged, batches, capped)
    finally:
        method.model.denoise = denoise
    assert len(calls) == 1 and len(capped) == (3 if harmful == "diffusion" else 0)
    separate = 0.0
    for batch in batches:
        if harmful == "esd":
            prediction = denoise(merged, batch.meta["x_t"], batch.timesteps, batch.meta["condition"])
            separate = separate + (prediction.float() - batch.meta["target"].float()).pow(2).mean()
        else:
            loss = diffusion_loss(method.model, merged, batch)
            separate = separate - (loss.detach() + 0.0 * loss if loss.item() > 0.3 else loss)
    assert torch.allclose(joined, separate, rtol=1e-5, atol=1e-7)
    lora = list(method.lora_state(params).values())
    a = torch.autograd.grad(joined, lora, retain_graph=True, allow_unused=True)
    b = torch.autograd.grad(separate, lora, allow_unused=True)
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None) and (x is None or torch.allclose(x, y, rtol=1e-4, atol=1e-7))


def test_relearn_weight_zero_is_plain_unlearning(world_model, tmp_path):
    method, params = _method(world_model, tmp_path, relearn_weight=0.0, concepts=["world:shape=star"])
    output = method.step(params, 0, torch.Generator().manual_seed(3))
    assert "harmful_loss_after_finetune" not in output.metrics
    generator = torch.Generator().manual_seed(3)
    lora = method.lora_state(params)
    merged = method.merged(lora)
    direct = method.harmful_loss(merged, method.harmful_batches(generator))
    direct = direct + method.config.retain_weight * method.retain_loss(merged, generator)
    expected = torch.autograd.grad(direct, list(lora.values()), allow_unused=True)
    for name, grad in zip(lora, expected, strict=True):
        if grad is not None:
            assert torch.allclose(output.grads[f"inner.lora/{name}"], grad), name


def test_metrics_say_which_finetunes_hit_the_target_and_whether_the_relearn_term_was_active(
    world_model, tmp_path
):
    def metrics(**overrides):
        method, params = _method(world_model, tmp_path, concepts=["world:shape=star"], **overrides)
        return method.step(params, 0, torch.Generator().manual_seed(3)).metrics

    # Without a bound every target batch after the fine-tune gives the relearn term a gradient...
    free = metrics(max_loss=None, finetune_data=["target"], finetune_samples=2)
    assert free["finetune_on_target"] == 1.0 and free["relearn_active"] == 1.0
    # ...with a bound below any reachable loss none does, and the benign fine-tunes are not on the target.
    capped = metrics(max_loss=1e-9, finetune_data=["retain"], finetune_samples=2)
    assert capped["finetune_on_target"] == 0.0 and capped["relearn_active"] == 0.0


def test_a_diverging_richardson_solve_falls_back_loudly_into_the_metrics(
    world_model, fast_world, tmp_path, caplog
):
    config = _resalign_config(
        concepts=["world:shape=star"], steps=2, finetune_methods=["full"], richardson_damping=1e6
    )
    with caplog.at_level(logging.WARNING):
        immunize(world_model, config, tmp_path / "run", progress=False, world=model_world(world_model))
    entries = [
        json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert entries[0]["richardson_fallbacks"] == 1.0
    assert entries[0]["richardson_backoffs"] == 3.0
    assert entries[-1]["richardson_fallbacks_total"] == 2.0  # a running count: both steps fell back
    assert any(r.name == "diffimmune.methods.resalign" and "first-order" in r.message for r in caplog.records)


def test_a_short_run_changes_only_attention_and_the_delta_is_the_merged_lora(
    world_model, fast_world, tmp_path
):
    original = {n: t.detach().clone() for n, t in world_model.named_parameters().items()}
    run = immunize(
        world_model, _resalign_config(), tmp_path / "run", progress=False, world=model_world(world_model)
    )
    attention = {n for n, t in select_parameters(world_model, "attn").items() if t.ndim == 2}
    assert run.changed and set(run.changed) <= attention
    assert len(run.changed) == len(attention)
    from safetensors.torch import load_file

    state = load_file(str(latest_checkpoint(tmp_path / "run" / "train") / "params.safetensors"))
    reloaded = load_model(tmp_path / "run").named_parameters()
    for name in attention:
        lora_a, lora_b = state[f"inner.lora/{name}.lora_A"], state[f"inner.lora/{name}.lora_B"]
        assert torch.allclose(reloaded[name], original[name] + lora_b @ lora_a, atol=1e-6), name
    for name in set(original) - attention:
        assert torch.equal(reloaded[name], original[name]), name
    entries = [
        json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {"richardson_residual", "richardson_iterations", "richardson_fallbacks"} <= set(entries[0])


def test_same_config_and_seed_give_the_same_delta(fast_world, tmp_path):
    model_dir = fast_world[1].model_dir
    deltas = []
    for index in range(2):
        model = load_model(model_dir)
        immunize(
            model, _resalign_config(steps=2), tmp_path / str(index), progress=False, world=model_world(model)
        )
        deltas.append(load_model(tmp_path / str(index)).named_parameters())
    assert all(torch.equal(deltas[0][n], deltas[1][n]) for n in deltas[0])


def test_cli_immunize_resalign_writes_a_delta(fast_world, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "immunize", "--model", str(fast_world[1].model_dir), "--method", "resalign", "--concepts", "star",
            "--steps", "2", "--relearn-weight", "0.5", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "delta" / "manifest.json").read_text())
    assert manifest["method"] == "resalign"
    assert load_model(out).named_parameters()


def test_the_anchor_adds_esd_at_the_sampler_states_to_the_direct_terms(world_model, tmp_path):
    weight = 3.0
    method, params = _method(
        world_model,
        tmp_path,
        relearn_weight=0.0,
        concepts=["world:shape=star"],
        anchor_weight=weight,
        retain_sampler_steps=3,
    )
    output = method.step(params, 0, torch.Generator().manual_seed(3))
    assert output.metrics["anchor_loss"] > 0
    generator = torch.Generator().manual_seed(3)  # the step's draws, in its order
    lora = method.lora_state(params)
    merged = method.merged(lora)
    direct = method.harmful_loss(merged, method.harmful_batches(generator))
    direct = direct + method.config.retain_weight * method.retain_loss(merged, generator)
    anchor = method.anchor.loss(merged, method.anchor.batch(generator))
    assert anchor.item() == pytest.approx(output.metrics["anchor_loss"])
    own = torch.autograd.grad(anchor, list(lora.values()), retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in own)
    expected = torch.autograd.grad(direct + weight * anchor, list(lora.values()), allow_unused=True)
    for name, grad in zip(lora, expected, strict=True):
        if grad is not None:
            assert torch.allclose(output.grads[f"inner.lora/{name}"], grad), name


def test_a_killed_run_with_a_refreshed_anchor_resumes_to_the_same_delta(assert_resumes_exactly):
    config = _resalign_config(
        concepts=["world:shape=star"], steps=4, anchor_weight=2.0, anchor_refresh=2, retain_sampler_steps=3
    )
    assert_resumes_exactly(config, killed_at=3)  # between the refreshes at steps 2 and 4
