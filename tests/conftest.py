"""Shared fixtures: tiny real diffusers models built from configs, saved to temporary folders."""

from __future__ import annotations

import os

import pytest
import torch

from diffimmune.models.diffusion_model import DiffusionModel, quiet_libraries
from diffimmune.models.tiny import TEST_WORDS, build_tiny_pipeline, build_word_tokenizer

torch.set_num_threads(int(os.environ.get("DIFFIMMUNE_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny Stable Diffusion pipeline (latent space, random weights) saved as a diffusers folder."""
    quiet_libraries()
    folder = tmp_path_factory.mktemp("tiny-sd") / "model"
    DiffusionModel.from_pipeline(build_tiny_pipeline(with_vae=True)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pixel_dir(tmp_path_factory):
    """The same without a VAE: the denoiser works in pixel space."""
    quiet_libraries()
    folder = tmp_path_factory.mktemp("tiny-pixel") / "model"
    DiffusionModel.from_pipeline(build_tiny_pipeline(with_vae=False, image_size=8)).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model(tiny_sd_dir):
    return DiffusionModel.from_pretrained(tiny_sd_dir, device="cpu")


@pytest.fixture
def tiny_pixel_model(tiny_pixel_dir):
    return DiffusionModel.from_pretrained(tiny_pixel_dir, device="cpu")


@pytest.fixture(scope="session")
def fast_world(tmp_path_factory):
    """The fast preset of the embedded default, built once per test session (about a minute)."""
    from diffimmune.recipes.world_build import build_world

    root = tmp_path_factory.mktemp("cache")
    return root, build_world("fast", root=root, progress=False, log=lambda message: None)


@pytest.fixture
def world_model(fast_world):
    return DiffusionModel.from_pretrained(fast_world[1].model_dir, device="cpu")


@pytest.fixture
def assert_resumes_exactly(fast_world, tmp_path):
    """A check that an immunization on the fast world killed after `killed_at` steps and run again ends
    with exactly the delta of an unbroken run of the same config."""
    from diffimmune.data.sources import model_world
    from diffimmune.methods.common import immunize
    from diffimmune.models.diffusion_model import load_model

    model_dir = fast_world[1].model_dir
    world = model_world(load_model(model_dir))

    def check(config, killed_at: int) -> None:
        def run(steps, folder):
            short = config.model_copy(update={"steps": steps})
            return immunize(load_model(model_dir), short, tmp_path / folder, progress=False, world=world)

        straight = run(config.steps, "straight")
        run(killed_at, "killed")  # its checkpoint holds the weights, the optimiser and the inner state
        resumed = run(config.steps, "killed")
        a = load_model(straight.out_dir).named_parameters()
        b = load_model(resumed.out_dir).named_parameters()
        assert straight.changed
        for name in straight.changed:
            assert torch.equal(a[name], b[name]), name

    return check


@pytest.fixture
def anchor_distance(fast_world, tmp_path):
    """How far a run's released weights leave the target prompts' predictions from ESD's erasure target, at
    every state the starting model's sampler visits for them (the anchor's loss over its whole pool)."""
    from diffimmune.core.objective import Batch
    from diffimmune.data.sources import model_world
    from diffimmune.methods.common import Context, immunize, method_registry
    from diffimmune.models.diffusion_model import load_model

    model_dir = fast_world[1].model_dir

    def measure(config, folder: str) -> float:
        model = load_model(model_dir)
        run = immunize(model, config, tmp_path / folder, progress=False, world=model_world(model))
        probe_model = load_model(model_dir)
        probe_config = config.model_copy(update={"anchor_weight": 1.0, "anchor_refresh": 0})
        context = Context(probe_model, probe_config, tmp_path / "probe", model_world(probe_model))
        probe = method_registry()[config.method](context)
        pool = probe.anchor.pool
        batch = Batch(pool.x0, pool.prompts, timesteps=pool.timesteps, noisy=True)
        trained = load_model(run.out_dir).named_parameters()
        return probe.anchor.loss({n: trained[n] for n in probe.theta_names}, batch).item()

    return measure


# Tiny random CLIP and DINOv2 checkpoints (the real ones cannot be downloaded here).
PROJECTION_DIM = 16
HIDDEN = 32


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    quiet_libraries()
    tokenizer = build_word_tokenizer(TEST_WORDS, max_length=16)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            # The word tokenizer's ids: CLIP pools the text at the end-of-text token.
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=PROJECTION_DIM,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dino_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    quiet_libraries()
    config = Dinov2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dino") / "tiny-dino"
    Dinov2Model(config).save_pretrained(folder)
    return folder
