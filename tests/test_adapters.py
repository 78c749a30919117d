"""Adapters: each one changes exactly what it should, starts at the released model, and LoRA round-trips
through the diffusers LoRA format."""

from __future__ import annotations

import pytest
import torch

from diffimmune.adapters.base import ADAPTERS, AdapterConfig, make_adapter, token_id
from diffimmune.adapters.lora import export_diffusers_lora
from diffimmune.core.objective import Batch, diffusion_loss, math_attention
from diffimmune.errors import DiffImmuneError
from diffimmune.models.params import select_parameters


def concept_batch(model):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return Batch(model.encode_images(images), ["a photo of a sks dog", "a sks dog"])


def one_step(model, adapter, learning_rate=1e-2):
    base = adapter.base_parameters(model)
    state = {n: t.detach().clone().requires_grad_(True) for n, t in adapter.init_state(model, base).items()}
    loss = diffusion_loss(
        model, adapter.view(model, base, state), concept_batch(model), torch.Generator().manual_seed(1)
    )
    grads = torch.autograd.grad(loss, list(state.values()), allow_unused=True)
    stepped = {
        n: (t - learning_rate * g.sign() if g is not None else t).detach()
        for (n, t), g in zip(state.items(), grads, strict=True)
    }
    return base, adapter.view(model, base, stepped)


def changed_names(model, base, view):
    named = model.named_parameters()
    return {n for n, t in view.items() if not torch.equal(t, named[n])}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_adapter_starts_at_the_released_weights(tiny_model, name):
    adapter = make_adapter(name)
    base = adapter.base_parameters(tiny_model)
    view = adapter.view(tiny_model, base, adapter.init_state(tiny_model, base))
    assert all(torch.equal(view[n], tiny_model.named_parameters()[n]) for n in view)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_shifted_state_is_the_start_plus_the_residual_and_differentiable_in_the_base(tiny_model, name):
    adapter = make_adapter(name)
    base = {
        n: t.detach().clone().requires_grad_(True) for n, t in adapter.base_parameters(tiny_model).items()
    }
    start = adapter.init_state(tiny_model, base)
    generator = torch.Generator().manual_seed(3)
    residual = {k: torch.randn(v.shape, generator=generator) for k, v in start.items()}
    shifted = adapter.shifted_state(tiny_model, base, residual)
    assert set(shifted) == set(start)
    for key in start:
        assert torch.equal(shifted[key], start[key] + residual[key])

    # The same gradient w.r.t. the base as the state built by hand.
    def total(state):
        return sum((v * v).sum() for v in adapter.view(tiny_model, base, state).values())

    by_hand = torch.autograd.grad(total({k: start[k] + residual[k] for k in start}), list(base.values()))
    ours = torch.autograd.grad(total(shifted), list(base.values()))
    for a, b in zip(by_hand, ours, strict=True):
        assert torch.allclose(a, b)


def test_lora_changes_only_the_attention_weights_it_targets(tiny_model):
    base, view = one_step(tiny_model, make_adapter("lora", AdapterConfig(rank=2)))
    changed = changed_names(tiny_model, base, view)
    attention = {n for n, t in select_parameters(tiny_model, "attn").items() if t.ndim == 2}
    assert changed and changed <= attention
    assert len(changed) > len(attention) // 2


def test_textual_inversion_changes_one_embedding_row(tiny_model):
    adapter = make_adapter("textual_inversion", AdapterConfig(token="sks", init_token="dog"))
    base, view = one_step(tiny_model, adapter)
    (name,) = view
    difference = (view[name] - tiny_model.named_parameters()[name]).abs().sum(1)
    assert difference.nonzero().flatten().tolist() == [token_id(tiny_model, "sks")]


def test_custom_diffusion_changes_cross_attention_kv_and_the_token_row(tiny_model):
    base, view = one_step(tiny_model, make_adapter("custom_diffusion"))
    changed = changed_names(tiny_model, base, view)
    kv = set(select_parameters(tiny_model, "xattn_kv"))
    (embedding,) = select_parameters(tiny_model, "text_embeddings")
    assert changed == kv | {embedding}


@pytest.mark.parametrize("name", ["full", "dreambooth"])
def test_full_and_dreambooth_change_the_unet_and_not_the_text_encoder(tiny_model, name):
    base, view = one_step(tiny_model, make_adapter(name))
    changed = changed_names(tiny_model, base, view)
    assert len(changed) > 0.9 * len(select_parameters(tiny_model, "unet"))
    assert all(n.startswith("unet.") for n in changed)


def test_unknown_token_is_a_clear_error(tiny_model):
    adapter = make_adapter("textual_inversion", AdapterConfig(token="<nope>"))
    with pytest.raises(DiffImmuneError, match="<nope>"):
        adapter.init_state(tiny_model, adapter.base_parameters(tiny_model))


def test_a_hypergradient_flows_from_the_adapted_loss_to_the_released_weights(tiny_model):
    adapter = make_adapter("lora")
    base = {
        n: t.detach().clone().requires_grad_(True) for n, t in adapter.base_parameters(tiny_model).items()
    }
    state = adapter.init_state(tiny_model, base)
    state = {n: t.detach().requires_grad_(True) for n, t in state.items()}
    batch = concept_batch(tiny_model)
    with math_attention():  # the fused CPU attention kernel has no double backward
        inner = diffusion_loss(
            tiny_model, adapter.view(tiny_model, base, state), batch, torch.Generator().manual_seed(2)
        )
        grads = torch.autograd.grad(inner, list(state.values()), create_graph=True)
        adapted = {n: t - 0.1 * g for (n, t), g in zip(state.items(), grads, strict=True)}
        outer = diffusion_loss(
            tiny_model, adapter.view(tiny_model, base, adapted), batch, torch.Generator().manual_seed(3)
        )
        hyper = torch.autograd.grad(outer, list(base.values()))
    assert sum(float(h.abs().sum()) for h in hyper) > 0


def test_exported_lora_loads_with_load_lora_weights_and_matches_the_functional_view(tiny_model, tmp_path):
    adapter = make_adapter("lora", AdapterConfig(rank=2, alpha=4.0))
    base = adapter.base_parameters(tiny_model)
    generator = torch.Generator().manual_seed(5)
    state = {
        n: torch.randn(t.shape, generator=generator) * 0.1
        for n, t in adapter.init_state(tiny_model, base).items()
    }
    export_diffusers_lora(adapter, state, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    x_t = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 500])
    text = tiny_model.encode_prompts(["a red star", "a blue circle"])
    with torch.no_grad():
        functional = tiny_model.denoise(adapter.view(tiny_model, base, state), x_t, t, text)
        plain = tiny_model.denoise(None, x_t, t, text)
        pipeline = tiny_model.as_pipeline()
        pipeline.load_lora_weights(tmp_path / "lora")
        loaded = pipeline.unet(x_t, t, encoder_hidden_states=text).sample
    assert not torch.allclose(functional, plain, atol=1e-4)
    assert torch.allclose(loaded, functional, atol=1e-5)


def test_a_placeholder_token_added_later_is_tokenized_with_its_new_id(tiny_model):
    from diffimmune.adapters.base import add_placeholder_token

    before = tiny_model.tokenize(["a <new> star"])[0, 2].item()
    new_id = add_placeholder_token(tiny_model, "<new>")
    assert before == tiny_model.tokenizer.unk_token_id != new_id
    assert tiny_model.tokenize(["a <new> star"])[0, 2].item() == new_id
    assert tiny_model.encode_prompts(["a <new> star"]).shape[0] == 1
