"""Recipe: build the embedded default, a generated concept world with a tiny model that knows it.

`build_world(preset)` generates the world's image folder, trains the concept detector (the world
classifier), pre-trains the text-to-image model on the *known* shapes only, and measures the quality
bar on the model's own generations. Everything lands in one cache folder keyed by the configuration,
so a second call returns at once and a killed build resumes. The result is a self-contained diffusers
folder: the model, plus `diffimmune/` with the classifier, the world's configuration, the quality
table and the build record.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from diffimmune.config import StrictModel, TrainConfig
from diffimmune.data.concepts import ConceptSet
from diffimmune.data.world import WorldConfig, generate_world_folder, world_vocabulary
from diffimmune.errors import DiffImmuneError
from diffimmune.files import atomic_folder, write_json_atomic
from diffimmune.recipes.pretrain import PretrainConfig, TinyModelConfig, pretrain

BUILD_FORMAT = 1
EXTRA_FOLDER = "diffimmune"  # inside the model folder: classifier, world config, quality, build record
ASSETS = Path(__file__).resolve().parent.parent / "assets"


class WorldBuildConfig(StrictModel):
    preset: str
    world: WorldConfig = WorldConfig()
    num_images: int = Field(default=20_000, gt=0)
    classifier_steps: int = Field(default=1500, gt=0)
    pretrain: PretrainConfig = PretrainConfig()
    quality_samples_per_shape: int = Field(default=32, gt=0)
    sampling_steps: int = 25
    guidance_scale: float = 4.0
    curve_every: int | None = 1000
    seed: int = 0

    def key(self) -> str:
        import hashlib

        text = json.dumps({"format": BUILD_FORMAT, **self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def preset_config(preset: str) -> WorldBuildConfig:
    if preset == "default":
        return WorldBuildConfig(preset="default")
    if preset == "fast":
        # Small enough for tests (about two minutes on two cores); it may fall short of the quality bar.
        return WorldBuildConfig(
            preset="fast",
            num_images=1500,
            classifier_steps=150,
            pretrain=PretrainConfig(
                model=TinyModelConfig(
                    unet_channels=(32, 64), attention_levels=(False, True), vae_channels=(16, 32)
                ),
                vae_train=TrainConfig(steps=60, learning_rate=2e-3, checkpoint_every=30, log_every=10),
                train=TrainConfig(
                    steps=150,
                    learning_rate=1e-3,
                    lr_schedule="cosine",
                    warmup_steps=20,
                    checkpoint_every=50,
                    log_every=10,
                ),
                batch_size=16,
                vae_batch_size=16,
            ),
            quality_samples_per_shape=4,
            sampling_steps=10,
            curve_every=None,
        )
    raise DiffImmuneError(f"unknown world preset '{preset}'; choose fast or default")


def cache_root() -> Path:
    return Path(os.environ.get("DIFFIMMUNE_CACHE", Path.home() / ".cache" / "diffimmune"))


@dataclass
class WorldBuild:
    folder: Path  # the build's working folder (data, runs)
    model_dir: Path  # the self-contained diffusers folder
    quality: dict
    built_now: bool
    origin: str = "built"  # built | cache | shipped

    @property
    def classifier_dir(self) -> Path:
        return self.model_dir / EXTRA_FOLDER / "classifier"


# ----------------------------------------------------------------------------- quality
def quality_prompts(world: WorldConfig, shape: str, count: int, seed: int) -> tuple[list[str], list[dict]]:
    """`count` prompts naming shape, style and colour, cycling through every style and colour."""
    rng = np.random.default_rng(seed)
    prompts, labels = [], []
    colours, backgrounds = list(world.colours), list(world.backgrounds)
    for index in range(count):
        style = world.styles[index % len(world.styles)]
        colour = colours[(index // len(world.styles) + int(rng.integers(len(colours)))) % len(colours)]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        prompts.append(f"a {colour} {shape} in {style} style on a {background} background")
        labels.append({"shape": shape, "style": style, "colour": colour, "background": background})
    return prompts, labels


def measure_quality(
    model,
    classifier,
    world: WorldConfig,
    samples_per_shape: int,
    steps: int,
    guidance: float,
    seed: int = 1234,
):
    """Per shape: how often the detector finds the prompted shape, style and colour in generations."""
    rows = {}
    for shape_index, shape in enumerate(world.shapes):
        prompts, labels = quality_prompts(world, shape, samples_per_shape, seed + shape_index)
        seeds = [seed * 1000 + shape_index * samples_per_shape + i for i in range(samples_per_shape)]
        images = model.generate(prompts, seeds=seeds, steps=steps, guidance_scale=guidance)
        predicted = classifier.predict(images)
        rows[shape] = {
            column: float(
                np.mean([p == lab[column] for p, lab in zip(predicted[column], labels, strict=True)])
            )
            for column in ("shape", "style", "colour")
        }
        rows[shape]["held_out"] = shape in world.held_out_shapes
    known = [rows[s] for s in world.known_shapes]
    summary = {
        f"{column}_accuracy": float(np.mean([r[column] for r in known]))
        for column in ("shape", "style", "colour")
    }
    return {"per_shape": rows, "known": summary, "samples_per_shape": samples_per_shape}


def measure_build_quality(model, classifier, config: WorldBuildConfig) -> dict:
    """The quality table with the build's own sampling settings."""
    return measure_quality(
        model,
        classifier,
        config.world,
        config.quality_samples_per_shape,
        config.sampling_steps,
        config.guidance_scale,
    )


QUALITY_BARS = {"classifier_shape_accuracy": 0.97, "shape_accuracy": 0.90, "style_accuracy": 0.80}


def quality_markdown(quality: dict) -> str:
    bars = quality["bars"]
    lines = [
        "## World model quality",
        "",
        f"Detector (world classifier) shape accuracy on held-out world images: "
        f"{quality['classifier']['shape_accuracy']:.1%} (bar {QUALITY_BARS['classifier_shape_accuracy']:.0%}: "
        f"{'pass' if bars['classifier'] else 'FAIL'})",
        "",
        f"Generations: {quality['samples_per_shape']} per shape, prompts naming shape, style and colour; "
        "the detector's agreement with the prompt.",
        "",
        "| shape | trained on | shape | style | colour |",
        "|---|---|---|---|---|",
    ]
    for shape, row in quality["per_shape"].items():
        trained = "no (held out)" if row["held_out"] else "yes"
        lines.append(
            f"| {shape} | {trained} | {row['shape']:.0%} | {row['style']:.0%} | {row['colour']:.0%} |"
        )
    known = quality["known"]
    lines += [
        f"| **known shapes** | | **{known['shape_accuracy']:.1%}** | **{known['style_accuracy']:.1%}** "
        f"| **{known['colour_accuracy']:.1%}** |",
        "",
        f"Bars on known shapes: shape >= {QUALITY_BARS['shape_accuracy']:.0%} "
        f"({'pass' if bars['shape'] else 'FAIL'}), style >= {QUALITY_BARS['style_accuracy']:.0%} "
        f"({'pass' if bars['style'] else 'FAIL'}).",
    ]
    if quality.get("curve"):
        lines += ["", "Learning curve (shape / style accuracy on known shapes at checkpoints):", ""]
        lines += [
            f"- step {c['step']}: {c['shape_accuracy']:.0%} / {c['style_accuracy']:.0%}"
            for c in quality["curve"]
        ]
    if quality.get("build_seconds") is not None:
        lines += ["", f"Build time: {quality['build_seconds'] / 60:.1f} min ({quality.get('command', '')})"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the build
def _shipped_asset(config: WorldBuildConfig) -> Path | None:
    folder = ASSETS / f"world-{config.preset}"
    record = folder / EXTRA_FOLDER / "build.json"
    if record.is_file() and json.loads(record.read_text()).get("key") == config.key():
        return folder
    return None


def load_world_quality(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / EXTRA_FOLDER / "quality.json").read_text())


def build_world(
    preset: str = "default",
    root: str | Path | None = None,
    rebuild: bool = False,
    progress: bool = True,
    log=print,
) -> WorldBuild:
    """Build (or find in the cache, or copy from the shipped assets) the world model of `preset`."""
    from diffimmune.eval.classifier import WorldClassifier, train_world_classifier
    from diffimmune.models.diffusion_model import DiffusionModel, quiet_libraries

    quiet_libraries()
    config = preset_config(preset)
    folder = Path(root or cache_root()) / "worlds" / f"{preset}-{config.key()}"
    model_dir = folder / "model"
    if rebuild:
        shutil.rmtree(folder, ignore_errors=True)
    if (model_dir / EXTRA_FOLDER / "build.json").is_file():
        return WorldBuild(folder, model_dir, load_world_quality(model_dir), built_now=False, origin="cache")
    shipped = None if rebuild else _shipped_asset(config)
    if shipped is not None:
        with atomic_folder(model_dir) as temporary:
            shutil.copytree(shipped, temporary, dirs_exist_ok=True)
        log(f"using the shipped {preset} world model ({shipped})")
        return WorldBuild(folder, model_dir, load_world_quality(model_dir), built_now=False, origin="shipped")

    began = time.perf_counter()
    timings = {}
    torch.manual_seed(config.seed)
    log(f"building the {preset} world in {folder}")
    data_dir = generate_world_folder(
        config.world, folder / "data", n=config.num_images, shapes=config.world.known_shapes, seed=config.seed
    )
    timings["data_s"] = time.perf_counter() - began

    classifier_dir = folder / "classifier"
    if (classifier_dir / "classifier.json").is_file():
        classifier = WorldClassifier.load(classifier_dir)
        classifier_metrics = json.loads((classifier_dir / "classifier.json").read_text()).get("metrics", {})
    else:
        started = time.perf_counter()
        classifier, classifier_metrics = train_world_classifier(
            config.world, steps=config.classifier_steps, seed=config.seed, progress=progress
        )
        classifier.save(classifier_dir)
        timings["classifier_s"] = time.perf_counter() - started
    log(f"detector: shape accuracy {classifier_metrics['shape_accuracy']:.1%} on held-out world images")

    curve: list[dict] = []
    curve_path = folder / "curve.json"
    if curve_path.is_file():
        curve = json.loads(curve_path.read_text())

    def learning_curve(step: int, model) -> None:
        if not config.curve_every or step % config.curve_every or step == config.pretrain.train.steps:
            return
        if any(c["step"] == step for c in curve):
            return
        measured = measure_quality(
            model, classifier, config.world, 8, config.sampling_steps, config.guidance_scale
        )
        curve.append({"step": step, **measured["known"]})
        write_json_atomic(curve_path, curve)
        log(
            f"step {step}: shape {measured['known']['shape_accuracy']:.0%}, style {measured['known']['style_accuracy']:.0%}"
        )

    started = time.perf_counter()
    trained_dir = pretrain(
        ConceptSet.from_folder(data_dir),
        config.pretrain,
        folder / "pretrain",
        resume=True,
        progress=progress,
        vocabulary=world_vocabulary(config.world),
        on_step_end=learning_curve,
    )
    timings["pretrain_s"] = time.perf_counter() - started

    model = DiffusionModel.from_pretrained(trained_dir, device="cpu")
    started = time.perf_counter()
    measured = measure_build_quality(model, classifier, config)
    timings["quality_s"] = time.perf_counter() - started
    seconds = time.perf_counter() - began
    command = f"diffimmune world build --preset {preset} --rebuild"
    quality = {
        **measured,
        "classifier": classifier_metrics,
        "curve": curve,
        "bars": {
            "classifier": classifier_metrics["shape_accuracy"] >= QUALITY_BARS["classifier_shape_accuracy"],
            "shape": measured["known"]["shape_accuracy"] >= QUALITY_BARS["shape_accuracy"],
            "style": measured["known"]["style_accuracy"] >= QUALITY_BARS["style_accuracy"],
        },
        "build_seconds": seconds,
        "timings": timings,
        "command": command,
    }
    with atomic_folder(model_dir) as temporary:
        shutil.copytree(trained_dir, temporary, dirs_exist_ok=True)
        extra = temporary / EXTRA_FOLDER
        extra.mkdir()
        shutil.copytree(classifier_dir, extra / "classifier")
        (extra / "world.json").write_text(config.world.model_dump_json(indent=2))
        (extra / "quality.json").write_text(json.dumps(quality, indent=2))
        (extra / "quality.md").write_text(quality_markdown(quality))
        (extra / "build.json").write_text(
            json.dumps(
                {
                    "key": config.key(),
                    "preset": preset,
                    "command": command,
                    "seconds": seconds,
                    "config": config.model_dump(mode="json"),
                },
                indent=2,
            )
        )
    return WorldBuild(folder, model_dir, quality, built_now=True)


def world_model_parts(model_dir: str | Path):
    """(world config, classifier) stored beside a world model."""
    from diffimmune.eval.classifier import WorldClassifier

    extra = Path(model_dir) / EXTRA_FOLDER
    if not (extra / "world.json").is_file():
        raise DiffImmuneError(
            f"{model_dir} is not a world model (no {EXTRA_FOLDER}/world.json); run diffimmune world build"
        )
    world = WorldConfig.model_validate_json((extra / "world.json").read_text())
    return world, WorldClassifier.load(extra / "classifier")


def ship_world(model_dir: str | Path, destination: str | Path | None = None, log=print) -> Path:
    """Copy a built world model into the package assets with its weights in float16 (half the size;
    loading upcasts to float32), then re-measure the quality table on exactly the shipped weights."""
    from safetensors.torch import load_file, save_file

    from diffimmune.eval.classifier import WorldClassifier
    from diffimmune.models.diffusion_model import DiffusionModel

    source = Path(model_dir)
    record = json.loads((source / EXTRA_FOLDER / "build.json").read_text())
    destination = Path(destination or ASSETS / f"world-{record['preset']}")
    with atomic_folder(destination) as temporary:
        shutil.copytree(source, temporary, dirs_exist_ok=True)
        for component in ("unet", "text_encoder", "vae"):
            for weights in (temporary / component).glob("*.safetensors"):
                tensors = {
                    n: t.half() if t.is_floating_point() else t for n, t in load_file(str(weights)).items()
                }
                save_file(tensors, str(weights), metadata={"format": "pt"})
    config = WorldBuildConfig.model_validate(record["config"])
    model = DiffusionModel.from_pretrained(destination, device="cpu")
    classifier = WorldClassifier.load(destination / EXTRA_FOLDER / "classifier")
    quality = load_world_quality(destination)
    measured = measure_build_quality(model, classifier, config)
    quality.update(measured)
    quality["bars"]["shape"] = measured["known"]["shape_accuracy"] >= QUALITY_BARS["shape_accuracy"]
    quality["bars"]["style"] = measured["known"]["style_accuracy"] >= QUALITY_BARS["style_accuracy"]
    quality["shipped"] = "float16 weights; table measured on them"
    write_json_atomic(destination / EXTRA_FOLDER / "quality.json", quality)
    (destination / EXTRA_FOLDER / "quality.md").write_text(quality_markdown(quality))
    size = sum(p.stat().st_size for p in destination.rglob("*") if p.is_file())
    log(f"shipped {destination} ({size / 1e6:.1f} MB)")
    return destination
