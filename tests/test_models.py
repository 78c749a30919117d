"""DiffusionModel: loading, saving, generation and deltas on tiny real diffusers models."""

from __future__ import annotations

import json

import pytest
import torch

from diffimmune.errors import DiffImmuneError
from diffimmune.models.diffusion_model import DiffusionModel
from diffimmune.models.params import select_parameters

PROMPTS = ["a red star", "a blue circle"]


def test_same_seed_gives_the_same_image_and_other_seeds_differ(tiny_model):
    first = tiny_model.generate(PROMPTS, seeds=[3, 4], steps=4)
    again = tiny_model.generate(PROMPTS, seeds=[3, 4], steps=4)
    other = tiny_model.generate(PROMPTS, seeds=[5, 6], steps=4)
    assert first.shape == (2, 3, 16, 16)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_a_seed_gives_the_same_image_in_any_batch(tiny_model):
    together = tiny_model.generate(PROMPTS, seeds=[3, 4], steps=3, batch_size=2)
    alone = tiny_model.generate(PROMPTS[1:], seeds=[4], steps=3, batch_size=1)
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_generation_equals_the_stable_diffusion_pipeline(tiny_model):
    ours = tiny_model.generate(PROMPTS, seeds=[1, 2], steps=5, guidance_scale=4.0)
    pipeline = tiny_model.as_pipeline()
    pipeline.scheduler = tiny_model.make_sampler("ddim")
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        PROMPTS,
        latents=tiny_model.initial_noise([1, 2]),
        num_inference_steps=5,
        guidance_scale=4.0,
        output_type="pt",
    ).images
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_saved_folder_reloads_with_identical_generations(tiny_model, tmp_path):
    from diffusers import DiffusionPipeline

    with torch.no_grad():
        select_parameters(tiny_model, "xattn_kv")[
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        ].add_(0.5)
    before = tiny_model.generate(PROMPTS, seeds=[7, 8], steps=4)
    tiny_model.save_pretrained(tmp_path / "saved")
    files = [p.name for p in (tmp_path / "saved").rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".ckpt", ".pt"))]
    assert "diffusion_pytorch_model.safetensors" in files
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    reloaded = DiffusionModel.from_pipeline(pipeline)
    assert torch.equal(reloaded.generate(PROMPTS, seeds=[7, 8], steps=4), before)


def test_pixel_space_model_generates_and_round_trips(tiny_pixel_model, tmp_path):
    assert tiny_pixel_model.vae is None
    images = tiny_pixel_model.generate(["a red star"], seeds=[0], steps=3)
    assert images.shape == (1, 3, 8, 8)
    x0 = tiny_pixel_model.encode_images(images)
    assert torch.allclose(tiny_pixel_model.decode(x0), images, atol=1e-6)
    tiny_pixel_model.save_pretrained(tmp_path / "pixel")
    again = DiffusionModel.from_pretrained(tmp_path / "pixel", device="cpu")
    assert torch.equal(again.generate(["a red star"], seeds=[0], steps=3), images)


def test_encode_images_maps_to_the_latent_space(tiny_model):
    images = torch.rand(3, 3, 16, 16)
    latents = tiny_model.encode_images(images)
    assert latents.shape == (3, 4, 8, 8)
    assert tiny_model.decode(latents).shape == (3, 3, 16, 16)


def test_encode_prompts_uses_replaced_embedding_rows(tiny_model):
    embeddings = select_parameters(tiny_model, "text_embeddings")
    name = next(iter(embeddings))
    plain = tiny_model.encode_prompts(["a sks star"])
    changed = embeddings[name].clone()
    sks = tiny_model.tokenizer.convert_tokens_to_ids("sks")
    changed[sks] += 1.0
    edited = tiny_model.encode_prompts(["a sks star"], {name: changed})
    untouched = tiny_model.encode_prompts(["a red star"], {name: changed})
    assert not torch.allclose(plain, edited)
    assert torch.allclose(untouched, tiny_model.encode_prompts(["a red star"]))


def test_delta_stores_only_changed_tensors_and_restores_them(tiny_sd_dir, tmp_path):
    model = DiffusionModel.from_pretrained(tiny_sd_dir, device="cpu")
    chosen = select_parameters(model, "xattn_kv")
    reference = model.snapshot(chosen)
    names = sorted(chosen)[:2]
    with torch.no_grad():
        for name in names:
            chosen[name].mul_(1.5)
    model.save_delta(
        tmp_path / "delta", reference, method="test", selection="xattn_kv", hyperparameters={"lr": 1.0}
    )
    manifest = json.loads((tmp_path / "delta" / "manifest.json").read_text())
    assert manifest["changed"] == names
    assert manifest["base_model"] == model.source
    restored = DiffusionModel.from_delta(tmp_path / "delta", device="cpu")
    for name in names:
        assert torch.equal(restored.named_parameters()[name], chosen[name])
    assert torch.equal(
        restored.generate(PROMPTS, seeds=[0, 1], steps=3), model.generate(PROMPTS, seeds=[0, 1], steps=3)
    )


def test_delta_refuses_a_different_base(tiny_sd_dir, tmp_path):
    model = DiffusionModel.from_pretrained(tiny_sd_dir, device="cpu")
    chosen = select_parameters(model, "xattn_kv")
    reference = model.snapshot(chosen)
    name = sorted(chosen)[0]
    with torch.no_grad():
        chosen[name].add_(1.0)
    model.save_delta(tmp_path / "delta", reference)
    other = DiffusionModel.from_pretrained(tiny_sd_dir, device="cpu")
    with torch.no_grad():
        other.named_parameters()[name].sub_(1.0)
    with pytest.raises(DiffImmuneError, match="another base model"):
        other.load_delta(tmp_path / "delta")


def test_delta_detects_a_tampered_tensor(tiny_sd_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = DiffusionModel.from_pretrained(tiny_sd_dir, device="cpu")
    chosen = select_parameters(model, "xattn_kv")
    reference = model.snapshot(chosen)
    with torch.no_grad():
        chosen[sorted(chosen)[0]].add_(1.0)
    model.save_delta(tmp_path / "delta", reference)
    values = load_file(str(tmp_path / "delta" / "delta.safetensors"))
    values = {k: v + 1 for k, v in values.items()}
    save_file(values, str(tmp_path / "delta" / "delta.safetensors"))
    with pytest.raises(DiffImmuneError, match="does not match its hash"):
        DiffusionModel.from_pretrained(tiny_sd_dir, device="cpu").load_delta(tmp_path / "delta")


def test_denoise_with_replaced_tensors_equals_functional_call_and_restores_the_model(tiny_model):
    from torch.func import functional_call

    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, *tiny_model.sample_shape, generator=generator)
    t = torch.tensor([10, 500])
    text = tiny_model.encode_prompts(["a red star", "a blue circle"])
    named = tiny_model.named_parameters()
    originals = {n: v for n, v in named.items() if n.startswith("unet.")}
    replaced = {n: (v.detach() * 1.01).requires_grad_(True) for n, v in originals.items()}
    ours = tiny_model.denoise(replaced, x_t, t, text)
    kwargs = {"encoder_hidden_states": text, "return_dict": False}
    stripped = {n.removeprefix("unet."): v for n, v in replaced.items()}
    reference = functional_call(tiny_model.unet, stripped, (x_t, t), kwargs, tie_weights=False)[0]
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ours, tiny_model.denoise(None, x_t, t, text))  # the replacement was used
    # Differentiable in the replaced tensors, and the model's own parameters are back in place.
    grads = torch.autograd.grad(ours.square().sum(), list(replaced.values()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(named[n] is v for n, v in tiny_model.named_parameters().items() if n in originals)
    # Also when the call fails half-way.
    with pytest.raises(RuntimeError):
        tiny_model.denoise(replaced, x_t[:, :1], t, text)
    assert all(named[n] is v for n, v in tiny_model.named_parameters().items() if n in originals)
