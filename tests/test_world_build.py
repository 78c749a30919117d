"""The embedded default: the fast preset builds end to end, is cached, and the same tiny model trains
on any captioned folder."""

from __future__ import annotations

import json
import time

import torch
from PIL import Image
from typer.testing import CliRunner

from diffimmune.cli import app
from diffimmune.config import TrainConfig
from diffimmune.data.concepts import ConceptSet
from diffimmune.models.diffusion_model import DiffusionModel
from diffimmune.recipes.pretrain import PretrainConfig, TinyModelConfig, pretrain
from diffimmune.recipes.world_build import EXTRA_FOLDER, build_world, world_model_parts

runner = CliRunner()


def test_fast_build_writes_a_self_contained_world_model(fast_world):
    _, build = fast_world
    assert build.built_now
    model = DiffusionModel.from_pretrained(build.model_dir, device="cpu")
    assert model.image_size == 32 and model.vae is not None
    world, classifier = world_model_parts(build.model_dir)
    quality = json.loads((build.model_dir / EXTRA_FOLDER / "quality.json").read_text())
    assert set(quality["per_shape"]) == set(world.shapes)
    # The detector learned the world's labels from its pixels: far above chance (1 in 12 shapes).
    assert quality["classifier"]["shape_accuracy"] > 0.5
    assert classifier.predict(model.generate(["a red star"], seeds=[0], steps=2))["shape"][0] in world.shapes


def test_second_build_is_served_from_the_cache_without_training(fast_world):
    root, build = fast_world
    metrics = build.folder / "pretrain" / "unet_run" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    started = time.perf_counter()
    again = build_world("fast", root=root, progress=False, log=lambda message: None)
    assert not again.built_now
    assert time.perf_counter() - started < 5
    assert metrics.stat().st_mtime_ns == before
    assert again.quality == build.quality


def test_cli_world_build_prints_the_quality_table(fast_world):
    root, _ = fast_world
    result = runner.invoke(app, ["world", "build", "--preset", "fast", "--cache", str(root)])
    assert result.exit_code == 0, result.output
    assert "| star | yes |" in result.output and "found (cached)" in result.output


def test_cli_world_build_rejects_an_unknown_preset(tmp_path):
    result = runner.invoke(app, ["world", "build", "--preset", "huge", "--cache", str(tmp_path)])
    assert result.exit_code == 2 and "unknown world preset 'huge'" in result.stderr


def captioned_folder(folder, count=12):
    """A user's folder: coloured squares and discs with captions in metadata.csv."""
    folder.mkdir()
    rows = ["file_name,text"]
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        pixels = torch.zeros(32, 32, 3, dtype=torch.uint8) + 255
        colour = torch.randint(0, 255, (3,), generator=generator, dtype=torch.uint8)
        if index % 2:
            pixels[8:24, 8:24] = colour
        else:
            pixels[12:20, 4:28] = colour
        Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
        rows.append(f"{index}.png,a {'square' if index % 2 else 'bar'} on white")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


TINY_PRETRAIN = PretrainConfig(
    model=TinyModelConfig(
        unet_channels=(16, 32), attention_levels=(False, True), text_hidden=32, text_heads=2
    ),
    vae_train=TrainConfig(steps=3, learning_rate=1e-3, log_every=1),
    train=TrainConfig(steps=4, learning_rate=1e-3, log_every=1),
    batch_size=4,
    vae_batch_size=4,
)


def test_pretraining_on_any_captioned_folder_is_deterministic(tmp_path):
    data = ConceptSet.from_folder(captioned_folder(tmp_path / "data"))
    first = DiffusionModel.from_pretrained(
        pretrain(data, TINY_PRETRAIN, tmp_path / "a", progress=False), device="cpu"
    )
    second = DiffusionModel.from_pretrained(
        pretrain(data, TINY_PRETRAIN, tmp_path / "b", progress=False), device="cpu"
    )
    assert all(torch.equal(t, second.named_parameters()[n]) for n, t in first.named_parameters().items())
    assert first.tokenizer.convert_tokens_to_ids("square") != first.tokenizer.unk_token_id
    assert first.generate(["a square on white"], seeds=[1], steps=2).shape == (1, 3, 32, 32)


def test_cli_base_train_names_a_folder_without_metadata(tmp_path):
    (tmp_path / "images").mkdir()
    result = runner.invoke(
        app, ["base", "train", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 2
    assert "no metadata.jsonl or metadata.csv" in result.stderr


def test_shipping_halves_the_weights_and_remeasures_quality(fast_world, tmp_path):
    from safetensors.torch import load_file

    from diffimmune.recipes.world_build import ship_world

    _, build = fast_world
    shipped = ship_world(build.model_dir, tmp_path / "shipped", log=lambda message: None)
    weights = load_file(str(shipped / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in weights.values())
    model = DiffusionModel.from_pretrained(shipped, device="cpu")
    assert model.unet.dtype == torch.float32 and model.text_encoder.dtype == torch.float32
    quality = json.loads((shipped / EXTRA_FOLDER / "quality.json").read_text())
    assert quality["shipped"].startswith("float16")
    size = sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file())
    original = sum(p.stat().st_size for p in build.model_dir.rglob("*") if p.is_file())
    assert size < 0.7 * original


def test_default_preset_copies_the_shipped_model_which_passes_the_quality_bars(tmp_path):
    build = build_world("default", root=tmp_path, progress=False, log=lambda message: None)
    assert build.origin == "shipped" and not build.built_now
    quality = build.quality
    assert quality["classifier"]["shape_accuracy"] >= 0.97
    assert quality["known"]["shape_accuracy"] >= 0.90 and quality["known"]["style_accuracy"] >= 0.80
    assert all(quality["bars"].values())
    model = DiffusionModel.from_pretrained(build.model_dir, device="cpu")
    _, classifier = world_model_parts(build.model_dir)
    images = model.generate(["a green star in stripes style"] * 8, seeds=list(range(8)))
    assert classifier.predict(images)["shape"].count("star") >= 7
