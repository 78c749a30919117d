"""Build small, real diffusers / transformers components from configs (no downloads).

The tiny Stable-Diffusion-layout pipeline serves the tests and the embedded concept world: a word-level
tokenizer, a CLIP text encoder, a UNet2DConditionModel and optionally an AutoencoderKL, all created
from configs so they load and save like any hub model.
"""

from __future__ import annotations

from collections.abc import Sequence

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_word_tokenizer(words: Sequence[str], max_length: int = 16, spare_tokens: Sequence[str] = ()):
    """A whitespace word-level tokenizer over `words` plus spare tokens for personalisation (`sks`...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary: dict[str, int] = {}
    for word in [*SPECIAL_TOKENS, *words, *spare_tokens]:
        vocabulary.setdefault(word, len(vocabulary))
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Like CLIP's tokenizer, frame every prompt with begin/end tokens (the end token marks the pooled slot).
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[("<bos>", vocabulary["<bos>"]), ("<eos>", vocabulary["<eos>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def build_text_encoder(
    vocab_size: int, hidden_size: int = 32, layers: int = 2, heads: int = 2, max_length: int = 16
):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return CLIPTextModel(config)


def build_unet(
    sample_size: int,
    in_channels: int,
    cross_attention_dim: int,
    block_out_channels: Sequence[int] = (32, 64),
    attention_levels: Sequence[bool] = (False, True),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    norm_num_groups: int = 8,
):
    """A UNet2DConditionModel. `norm_num_groups` stays below the first width on purpose: with one
    channel per group GroupNorm becomes instance norm and the network cannot represent mean colour."""
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def build_vae(
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (32, 64),
    norm_num_groups: int = 8,
    mid_attention: bool = False,
):
    """An AutoencoderKL that downsamples by 2 ** (len(block_out_channels) - 1). Its mid-block attention
    is off by default: at this size it more than doubles the step time."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        mid_block_add_attention=mid_attention,
        sample_size=32,
    )


def build_scheduler(prediction_type: str = "epsilon", num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


TEST_WORDS = ("a", "red", "green", "blue", "star", "circle", "square", "in", "style", "photo", "of", "dog")


def build_tiny_pipeline(
    image_size: int = 16,
    with_vae: bool = True,
    prediction_type: str = "epsilon",
    words: Sequence[str] = TEST_WORDS,
    seed: int = 0,
):
    """The smallest real StableDiffusionPipeline (random weights), for tests and as a template."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(words, max_length=8, spare_tokens=("sks", "<v1>", "<v2>"))
    text_encoder = build_text_encoder(len(tokenizer), hidden_size=32, max_length=8)
    vae = build_vae(latent_channels=4) if with_vae else None
    latent_size, channels = (image_size // 2, 4) if with_vae else (image_size, 3)
    unet = build_unet(latent_size, channels, cross_attention_dim=32)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
