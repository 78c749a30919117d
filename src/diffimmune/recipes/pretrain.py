"""Recipe: pre-train a small text-to-image model from scratch on any captioned image folder.

Stages, each resumable and skipped when its output exists: (1) a word-level tokenizer from the
captions, (2) a tiny AutoencoderKL (when `model.latent`), (3) the images encoded once into latents,
(4) the UNet and CLIP text encoder trained jointly with classifier-free-guidance dropout, through the
one training loop. The result is an ordinary diffusers Stable Diffusion folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import Field

from diffimmune.config import StrictModel, TrainConfig
from diffimmune.core.objective import Batch, diffusion_loss
from diffimmune.core.train import train
from diffimmune.data.concepts import ConceptSet
from diffimmune.errors import DiffImmuneError
from diffimmune.files import atomic_file, atomic_folder
from diffimmune.models import tiny
from diffimmune.models.diffusion_model import DiffusionModel, quiet_libraries

SPARE_TOKENS = ("sks", "<v1>", "<v2>", "<v3>", "<v4>")


class TinyModelConfig(StrictModel):
    """Sizes of the tiny model. Latent space with a 2x VAE by default (4x cheaper than 32x32 pixels)."""

    resolution: int = Field(default=32, gt=0)
    latent: bool = True
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (48, 96, 96)
    attention_levels: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_prompt_length: int = 20
    spare_tokens: tuple[str, ...] = SPARE_TOKENS
    prediction_type: str = "epsilon"
    seed: int = 0


class PretrainConfig(StrictModel):
    model: TinyModelConfig = TinyModelConfig()
    vae_train: TrainConfig = TrainConfig(steps=400, learning_rate=2e-3, checkpoint_every=100, log_every=50)
    vae_batch_size: int = 32
    kl_weight: float = 1e-6
    train: TrainConfig = TrainConfig(
        steps=6000,
        learning_rate=8e-4,
        lr_schedule="cosine",
        warmup_steps=300,
        checkpoint_every=250,
        log_every=50,
    )
    batch_size: int = 32
    cfg_dropout: float = Field(default=0.1, ge=0, le=1)
    snr_gamma: float | None = 5.0


def caption_words(prompts: Sequence[str]) -> list[str]:
    return sorted({word for prompt in prompts for word in prompt.lower().split()})


def build_tokenizer(config: TinyModelConfig, words: Sequence[str]):
    return tiny.build_word_tokenizer(
        words, max_length=config.max_prompt_length, spare_tokens=config.spare_tokens
    )


# ----------------------------------------------------------------------------- the autoencoder
def train_vae(images: torch.Tensor, config: PretrainConfig, out_dir: Path, resume: bool, progress: bool):
    """A tiny AutoencoderKL: L1 + MSE reconstruction plus a small KL term; its scaling factor is set
    so that latents have unit variance, as Stable Diffusion's are."""
    from diffusers import AutoencoderKL

    done = out_dir / "vae"
    if (done / "config.json").is_file():
        return AutoencoderKL.from_pretrained(done, use_safetensors=True)
    torch.manual_seed(config.model.seed)
    vae = tiny.build_vae(
        config.model.latent_channels, config.model.vae_channels, config.model.norm_num_groups
    )
    vae.train()
    params = dict(vae.named_parameters())

    def step_fn(values, step, generator):
        index = torch.randint(0, images.shape[0], (config.vae_batch_size,), generator=generator)
        pixels = images[index] * 2 - 1
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        error = reconstruction - pixels
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = error.abs().mean() + error.pow(2).mean() + config.kl_weight * kl
        return loss, {"kl": float(kl.detach())}

    train(
        params,
        step_fn,
        config.vae_train,
        out_dir / "vae_run",
        resume=resume,
        progress=progress,
        description="autoencoder",
    )
    vae.eval()
    with torch.no_grad():
        sample = torch.cat(
            [
                vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean
                for i in range(0, min(len(images), 2048), 256)
            ]
        )
    vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
    with atomic_folder(done) as temporary:
        vae.save_pretrained(temporary, safe_serialization=True)
    return vae


@torch.no_grad()
def encode_dataset(model: DiffusionModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat(
        [model.encode_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


# ----------------------------------------------------------------------------- the denoiser
def build_untrained_model(config: TinyModelConfig, words: Sequence[str], vae=None) -> DiffusionModel:
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config, words)
    text_encoder = tiny.build_text_encoder(
        len(tokenizer), config.text_hidden, config.text_layers, config.text_heads, config.max_prompt_length
    )
    factor = 2 ** (len(config.vae_channels) - 1) if config.latent else 1
    unet = tiny.build_unet(
        sample_size=config.resolution // factor,
        in_channels=config.latent_channels if config.latent else 3,
        cross_attention_dim=config.text_hidden,
        block_out_channels=config.unet_channels,
        attention_levels=config.attention_levels,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_heads,
        norm_num_groups=config.norm_num_groups,
    )
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(tiny.build_scheduler(config.prediction_type).config)
    return DiffusionModel(unet, text_encoder, tokenizer, scheduler, vae=vae if config.latent else None)


def pretrain(
    data: ConceptSet,
    config: PretrainConfig,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    vocabulary: Sequence[str] | None = None,
    on_step_end: Callable[[int, DiffusionModel], None] | None = None,
) -> Path:
    """Train the tiny model on `data`; returns the diffusers folder `out_dir/model`.
    `vocabulary` adds words the captions may lack (a world's full template vocabulary)."""
    quiet_libraries()
    out_dir = Path(out_dir)
    final = out_dir / "model"
    if (final / "model_index.json").is_file():
        return final
    if len(data) < 2:
        raise DiffImmuneError(f"{data.root} has {len(data)} image(s); pre-training needs a folder of many")
    resolution = config.model.resolution
    images = data.images(size=resolution)
    prompts = data.prompts()
    words = sorted(set(caption_words(prompts)) | set(vocabulary or ()))
    vae = train_vae(images, config, out_dir, resume, progress) if config.model.latent else None
    model = build_untrained_model(config.model, words, vae)
    latents_path = out_dir / "latents.safetensors"
    from safetensors.torch import load_file, save_file

    if latents_path.is_file():
        latents = load_file(str(latents_path))["latents"]
    else:
        latents = encode_dataset(model, images)
        with atomic_file(latents_path) as temporary:
            save_file({"latents": latents.contiguous()}, str(temporary))
    params = {f"unet.{n}": p for n, p in model.unet.named_parameters()}
    params.update({f"text_encoder.{n}": p for n, p in model.text_encoder.named_parameters()})
    model.unet.train()
    model.text_encoder.train()

    def step_fn(values, step, generator):
        index = torch.randint(0, len(latents), (config.batch_size,), generator=generator)
        dropped = torch.rand(config.batch_size, generator=generator) < config.cfg_dropout
        batch_prompts = [
            "" if drop else prompts[i] for i, drop in zip(index.tolist(), dropped.tolist(), strict=True)
        ]
        batch = Batch(x0=latents[index], prompts=batch_prompts)
        return diffusion_loss(model, values, batch, generator, snr_gamma=config.snr_gamma)

    def after_step(step, values):
        if on_step_end is not None:
            model.unet.eval()
            model.text_encoder.eval()
            on_step_end(step, model)
            model.unet.train()
            model.text_encoder.train()

    train(
        params,
        step_fn,
        config.train,
        out_dir / "unet_run",
        resume=resume,
        progress=progress,
        description="text-to-image model",
        on_step_end=after_step,
    )
    model.unet.eval()
    model.text_encoder.eval()
    model.source = str(final.resolve())
    model.save_pretrained(final)
    (out_dir / "pretrain.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    return final
