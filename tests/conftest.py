"""Shared fixtures: tiny real diffusers models built from configs, saved to temporary folders."""

from __future__ import annotations

import os

import pytest
import torch

from diffimmune.models.diffusion_model import DiffusionModel, quiet_libraries
from diffimmune.models.tiny import build_tiny_pipeline

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
