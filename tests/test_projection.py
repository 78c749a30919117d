"""retain_projection (core/projection.py): a projected change leaves every layer's output on the retain
inputs where it was and still moves it on other inputs; tensors without an input to project against are
frozen; on the fast world an immunization under it drifts far less on the retain data than one without,
resumes to the same delta, and takes the flag from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from typer.testing import CliRunner

from diffimmune.cli import app
from diffimmune.core.objective import Batch, distillation_loss
from diffimmune.core.projection import retain_bases
from diffimmune.data.sources import model_world
from diffimmune.methods.common import Context, ImmunizeConfig, immunize, method_registry
from diffimmune.models.diffusion_model import load_model

runner = CliRunner()


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.linear = nn.Linear(6, 5)
        self.plain = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        h = self.norm(self.conv(x)).mean((2, 3))
        return self.plain(self.linear(h))


def retain_images(generator: torch.Generator, count: int = 64) -> torch.Tensor:
    """Images whose pixels all lie in one 2-dimensional subspace of the 4 channels."""
    directions = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    coefficients = torch.randn(count, 2, 8, 8, generator=generator, dtype=torch.float64)
    return torch.einsum("bkhw,kc->bchw", coefficients, directions)


def layer_outputs(toy: Toy, x: torch.Tensor) -> dict[str, torch.Tensor]:
    conv = toy.conv(x)
    h = toy.norm(conv).mean((2, 3))
    linear = toy.linear(h)
    return {"conv": conv, "linear": linear, "plain": toy.plain(linear)}


def projected_toy(energy: float = 1 - 1e-9, trained=None):
    generator = torch.Generator().manual_seed(0)
    toy = Toy().double()
    retain = retain_images(generator)
    trained = trained or [f"toy.{n}" for n, _ in toy.named_parameters() if not n.startswith("norm")]
    projection = retain_bases(toy, "toy.", trained, lambda: toy(retain), energy)
    return toy, retain, projection, generator


def test_a_projected_change_keeps_each_layers_outputs_on_the_retain_inputs():
    toy, retain, projection, generator = projected_toy()
    start = {f"toy.{n}": p.detach().clone() for n, p in toy.named_parameters()}
    before = layer_outputs(toy, retain)
    other = torch.randn(8, 4, 8, 8, generator=generator, dtype=torch.float64)
    before_other = layer_outputs(toy, other)
    params = {n: p + torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in start.items()}
    params |= {n: p for n, p in start.items() if n.startswith("toy.norm")}  # not trained
    projection.project_params_(params, start)
    with torch.no_grad():
        for name, p in toy.named_parameters():
            p.copy_(params[f"toy.{name}"])
    after, after_other = layer_outputs(toy, retain), layer_outputs(toy, other)
    # Layer by layer, on what each layer receives from the (changed) layers before it: the conv sees the
    # retain images themselves, so its retain outputs stay put exactly; the change is large elsewhere.
    assert torch.allclose(after["conv"], before["conv"], atol=1e-9)
    assert (after_other["conv"] - before_other["conv"]).abs().max() > 0.1
    # The linear layers' inputs moved with the conv's change off the retain data only, so on the retain
    # data the whole network's output is kept.
    assert torch.allclose(after["plain"], before["plain"], atol=1e-8)
    assert (after_other["plain"] - before_other["plain"]).abs().max() > 0.01
    # Projecting again changes nothing (a projection), and the bias moved with its weight.
    again = {n: t.clone() for n, t in params.items()}
    projection.project_params_(again, start)
    assert all(torch.allclose(again[n], params[n], atol=1e-12) for n in params)
    assert not torch.equal(params["toy.conv.bias"], start["toy.conv.bias"])


def test_an_unprojected_change_moves_the_retain_outputs():
    """The control: the same random change without the projection moves the conv's retain outputs."""
    toy, retain, _, generator = projected_toy()
    before = toy.conv(retain)
    with torch.no_grad():
        for p in toy.conv.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    assert (toy.conv(retain) - before).abs().max() > 0.1


def test_tensors_without_an_input_to_project_against_are_frozen():
    trained = ["toy.norm.weight", "toy.linear.bias", "toy.conv.weight"]
    toy, _, projection, generator = projected_toy(trained=trained)
    assert sorted(projection.frozen) == ["toy.linear.bias", "toy.norm.weight"]
    grads = {n: torch.randn(3, generator=generator) for n in ("toy.norm.weight", "toy.linear.bias")}
    projection.project_(grads)
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())
    assert [layer.weight for layer in projection.layers] == ["toy.conv.weight"]
    assert projection.layers[0].bias is None  # an untrained bias is not projected with its weight


def test_a_lower_energy_keeps_fewer_directions():
    ranks = [projected_toy(energy)[2].layers[0].rank for energy in (0.5, 0.9, 1 - 1e-9)]
    assert ranks[0] < ranks[1] < ranks[2] < 4 * 9 + 1  # the retain patches span a proper subspace


def retain_drift(model, context, released) -> float:
    """Distillation loss of `released` on every retain image, one fixed noisy sample each."""
    retain = context.retain
    batch = Batch(retain.x0, retain.prompts)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(distillation_loss(model, released, batch, generator))


def small_imma(**overrides) -> ImmunizeConfig:
    """A few first-order IMMA steps on the star, on small data."""
    settings = {"concepts": ["world:shape=star"], "hypergradient": "first_order", "batch_size": 2}
    settings |= {"num_images": 4, "reg_prompts": 16, "retain_projection_samples": 32}
    return ImmunizeConfig(method="imma", **{**settings, **overrides})


def test_an_immunization_under_the_projection_keeps_the_retain_data_far_better(fast_world, tmp_path):
    world_dir = fast_world[1].model_dir
    settings = {"selection": "unet", "steps": 3, "learning_rate": 1e-3, "retain_projection_samples": 64}
    drifts, moved = {}, {}
    for label, extra in (("plain", {}), ("projected", {"retain_projection": 0.999})):
        model = load_model(world_dir)
        start = {n: t.detach().clone() for n, t in model.named_parameters().items()}
        config = small_imma(**settings, **extra)
        run = immunize(model, config, tmp_path / label, progress=False, world=model_world(model))
        reference = load_model(world_dir)
        context = Context(reference, config, tmp_path / f"{label}-probe", model_world(reference))
        released = {n: model.named_parameters()[n] for n in run.changed}
        drifts[label] = retain_drift(reference, context, released)
        moved[label] = sum(float((released[n] - start[n]).norm()) for n in run.changed)
        if label == "projected":
            # normalisation and embedding tensors stay where they were; linear and conv layers move
            assert not any("norm" in n for n in run.changed)
            assert any(n.endswith("conv1.weight") for n in run.changed)
    assert moved["projected"] > 0.2 * moved["plain"]  # the weights still move about as much ...
    assert drifts["projected"] < 0.2 * drifts["plain"]  # ... with a fraction of the drift on retain data


def test_a_killed_projected_run_resumes_to_the_same_delta(assert_resumes_exactly):
    assert_resumes_exactly(small_imma(steps=4, checkpoint_every=1, retain_projection=0.99), killed_at=2)


def test_cli_takes_retain_projection_and_refuses_bad_values(fast_world, tmp_path):
    out = tmp_path / "run"
    arguments = [
        "immunize", "--model", str(fast_world[1].model_dir), "--method", "imma", "--concepts", "star",
        "--steps", "1", "--hypergradient", "first_order", "--retain-projection", "0.9",
        "--retain-projection-target-words", "--out", str(out),
    ]  # fmt: skip
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    written = json.loads((out / "immunize.json").read_text())["config"]
    assert written["retain_projection"] == 0.9 and written["retain_projection_target_words"] is True
    with pytest.raises(ValidationError, match="retain_projection"):
        ImmunizeConfig(method="imma", concepts=["world:shape=star"], retain_projection=1.5)
    bad = arguments[:-2] + ["--selection", "text_encoder", "--out", str(tmp_path / "bad")]
    result = runner.invoke(app, bad)
    assert result.exit_code != 0 and "choose a denoiser selection" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "bad" / "immunize.json").exists()


def test_the_context_measures_bases_for_the_trained_layers(world_model, tmp_path):
    config = small_imma(selection="attn", retain_projection=0.9)
    context = Context(world_model, config, tmp_path, model_world(world_model))
    method = method_registry()["imma"](context)
    projection = context.retain_projection(method.theta_names)
    weights = {layer.weight for layer in projection.layers}
    assert weights == {n for n in method.theta_names if n.endswith(".weight")}
    assert 0 < projection.summary()["free_share"] < 1


def test_a_change_with_only_one_part_of_a_joint_layer_is_projected_as_the_full_row():
    """A gradient dict without the weight (or bias) of a layer projected jointly reads the missing part as
    zero, as the full [weight | bias] row with that part zero would be projected."""
    toy, _, projection, generator = projected_toy()
    conv = next(layer for layer in projection.layers if layer.weight == "toy.conv.weight")
    weight, bias = toy.conv.weight, toy.conv.bias
    for present in ("toy.conv.weight", "toy.conv.bias"):
        full = {
            "toy.conv.weight": torch.zeros_like(weight),
            "toy.conv.bias": torch.zeros_like(bias),
        }
        full[present] = torch.randn(full[present].shape, generator=generator, dtype=weight.dtype)
        alone = {present: full[present].clone()}
        projection.project_(alone)
        projection.project_(full)
        assert torch.allclose(alone[present], full[present], atol=1e-12)
        if present.endswith("weight"):  # a bias alone moves every retain output: nothing of it is free
            assert not torch.allclose(alone[present], torch.zeros_like(alone[present]))
    assert conv.bias == "toy.conv.bias"


def test_target_words_keep_the_cross_attention_outputs_on_the_target_words(world_model, tmp_path):
    """With retain_projection_target_words, a projected change of cross-attention K/V leaves their outputs
    on the target word's token embeddings where they were (the erasure stays); without it the same change
    moves them. Other layers' bases do not change."""
    from diffimmune.methods.common import prompt_fed_inputs, word_embeddings

    width = world_model.text_encoder.config.hidden_size
    layers = list(prompt_fed_inputs(world_model.unet, torch.zeros(1, width)))
    assert layers and all(name.endswith((".to_k", ".to_v")) and "attn2" in name for name in layers)
    projections = {}
    for kept in (False, True):
        config = small_imma(selection="unet", retain_projection=0.9, retain_projection_target_words=kept)
        context = Context(world_model, config, tmp_path / str(kept), model_world(world_model))
        method = method_registry()["imma"](context)
        projections[kept] = context.retain_projection(method.theta_names)
    star = context.concepts[0]
    words = word_embeddings(world_model, star.prompts, star.word)
    named = world_model.named_parameters()
    moved = {}
    for kept, projection in projections.items():
        generator = torch.Generator().manual_seed(0)  # the same change for both
        changes = {f"unet.{name}.weight": torch.randn(named[f"unet.{name}.weight"].shape, generator=generator)
                   for name in layers}  # fmt: skip
        projection.project_(changes)
        moved[kept] = max(float((words @ change.T).norm() / change.norm()) for change in changes.values())
    assert moved[True] < 1e-4 * moved[False]
    ranks = {kept: {layer.weight: layer.rank for layer in p.layers} for kept, p in projections.items()}
    for name, rank in ranks[True].items():
        text_layer = any(name == f"unet.{layer}.weight" for layer in layers)
        assert rank > ranks[False][name] if text_layer else rank == ranks[False][name]
    with pytest.raises(ValidationError, match="set retain_projection too"):
        ImmunizeConfig(method="imma", concepts=["world:shape=star"], retain_projection_target_words=True)


def projector(projection, weight: str) -> torch.Tensor:
    """The layer's projection as a matrix: rows (I - U U^T), read off the identity."""
    layer = next(layer for layer in projection.layers if layer.weight == weight)
    return layer.project(torch.eye(layer.dims, dtype=torch.float64))


def test_layers_measured_in_groups_under_a_memory_budget_get_the_same_bases():
    """A budget under one layer's moment measures each layer in a retain pass of its own (what SD-sized
    convolutions need); the projections equal those of one pass over all layers."""
    generator = torch.Generator().manual_seed(0)
    toy = Toy().double()
    retain = retain_images(generator)
    trained = [f"toy.{n}" for n, _ in toy.named_parameters() if not n.startswith("norm")]
    calls = []

    def run():
        calls.append(1)
        toy(retain)

    together = retain_bases(toy, "toy.", trained, run, 0.99)
    assert len(calls) == 1 and together.passes == 1
    apart = retain_bases(toy, "toy.", trained, run, 0.99, memory_budget=1)
    assert len(calls) == 1 + 3 and apart.passes == 3  # conv, linear, plain: one pass each
    for layer in together.layers:
        assert torch.allclose(projector(apart, layer.weight), projector(together, layer.weight), atol=1e-10)


def test_a_basis_over_half_its_dimensions_is_stored_as_the_free_directions():
    from diffimmune.core.projection import LayerBasis

    generator = torch.Generator().manual_seed(0)
    kept, _ = torch.linalg.qr(torch.randn(10, 7, generator=generator, dtype=torch.float64))
    large = LayerBasis.of("w", None, kept, torch.float64)
    small = LayerBasis.of("w", None, kept[:, :3], torch.float64)
    assert large.complement and large.basis.shape == (10, 3) and large.rank == 7
    assert not small.complement and small.basis.shape == (10, 3) and small.rank == 3
    rows = torch.randn(5, 10, generator=generator, dtype=torch.float64)
    assert torch.allclose(large.project(rows), rows - rows @ kept @ kept.T, atol=1e-12)
    assert torch.allclose(small.project(rows), rows - rows @ kept[:, :3] @ kept[:, :3].T, atol=1e-12)


def test_prompt_fed_inputs_follow_an_attentions_prompt_normalisation():
    """K/V receive the prompt embeddings, normalised first where the attention has `norm_cross`; a
    self-attention is not prompt-fed."""
    from diffusers.models.attention_processor import Attention

    from diffimmune.methods.common import prompt_fed_inputs

    holder = nn.Module()
    holder.plain = Attention(8, cross_attention_dim=6, heads=2, dim_head=4)
    holder.normed = Attention(
        8, cross_attention_dim=6, heads=2, dim_head=4, cross_attention_norm="layer_norm"
    )
    holder.own = Attention(8, heads=2, dim_head=4)
    rows = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    inputs = prompt_fed_inputs(holder, rows)
    assert sorted(inputs) == ["normed.to_k", "normed.to_v", "plain.to_k", "plain.to_v"]
    assert torch.equal(inputs["plain.to_k"], rows)
    assert torch.allclose(inputs["normed.to_v"], holder.normed.norm_cross(rows), atol=1e-6)
    assert not torch.allclose(inputs["normed.to_v"], rows, atol=1e-2)


def test_resalign_under_the_projection_keeps_its_merged_lora_in_the_free_directions(world_model, tmp_path):
    """ResAlign trains LoRA factors: with A's rows kept in each layer's free input directions, the merged
    change B A of every released tensor is its own projection (its retain outputs do not move), while the
    same run without the projection changes them in the retain directions too."""
    from diffimmune.models.params import select_parameters

    settings = {"method": "resalign", "concepts": ["world:shape=star"], "steps": 2, "batch_size": 2}
    settings |= {"num_images": 4, "reg_prompts": 16, "finetune_steps": (1, 1), "finetune_samples": 1}
    settings |= {"hypergradient": "first_order", "retain_weight": 1.0, "retain_projection_samples": 32}
    start = {n: t.detach().clone() for n, t in world_model.named_parameters().items()}
    attention = [n for n, t in select_parameters(world_model, "attn").items() if t.ndim == 2]
    config = ImmunizeConfig(**settings, retain_projection=0.9)
    context = Context(world_model, config, tmp_path / "probe", model_world(world_model))
    projection = context.retain_projection(method_registry()["resalign"](context).theta_names)
    assert {layer.weight for layer in projection.layers} == set(attention)
    outside = {}
    for label, extra in (("plain", {}), ("projected", {"retain_projection": 0.9})):
        world_model.load_parameters(start)
        config = ImmunizeConfig(**settings, **extra)
        run = immunize(world_model, config, tmp_path / label, progress=False, world=model_world(world_model))
        assert set(run.changed) == set(attention)
        released = world_model.named_parameters()
        changes = {n: (released[n] - start[n]).detach().clone() for n in attention}
        projected = {n: c.clone() for n, c in changes.items()}
        projection.project_(projected)
        outside[label] = max(float((changes[n] - projected[n]).norm() / changes[n].norm()) for n in attention)
    assert outside["projected"] < 1e-4 and outside["plain"] > 0.05
