"""Shared fixtures: tiny real diffusers models built from configs, saved to temporary folders."""

from __future__ import annotations

import pytest
import torch

from diffimmune.models.diffusion_model import DiffusionModel, quiet_libraries
from diffimmune.models.tiny import build_tiny_pipeline

torch.set_num_threads(2)


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
