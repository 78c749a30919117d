"""Evaluation of attack runs: metrics at every saved step, in a long-format CSV, with cached samples."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from diffimmune.attacks.runner import run_attack
from diffimmune.cli import app
from diffimmune.config import AttackConfig
from diffimmune.data.sources import model_world
from diffimmune.eval.evaluate import EvalSettings, evaluate_run, read_metrics_csv


def test_evaluate_writes_every_metric_at_every_step_and_reuses_samples(world_model, tmp_path):
    config = AttackConfig(
        method="textual_inversion",
        learning_rate=5e-3,
        steps=2,
        batch_size=2,
        num_images=4,
        data="world:shape=heart",
        prompt="a {colour} {token} in {style} style",
        save_at=[0],
    )
    run_attack(world_model, config, tmp_path / "run" / "ti", progress=False, world=model_world(world_model))
    settings = EvalSettings(samples=4, steps=3, references=8, other_concepts=2)
    path = evaluate_run(tmp_path / "run", settings)
    rows = read_metrics_csv(path)
    assert {r["step"] for r in rows} == {0, 2}
    metrics = {(r["concept"], r["metric"]) for r in rows}
    assert ("shape=heart", "detection") in metrics and ("shape=heart", "best_of_25") in metrics
    assert ("safe", "fid_world") in metrics and ("shape=circle", "detection") in metrics
    assert all(0 <= r["value"] <= 1 for r in rows if r["metric"] in ("detection", "best_of_25"))
    samples = sorted((tmp_path / "run" / "ti" / "steps").rglob("*.png"))
    assert len(samples) == 2 * 3 * 4  # two steps x three concepts x four samples
    stamps = [p.stat().st_mtime_ns for p in samples]
    again = read_metrics_csv(evaluate_run(tmp_path / "run", settings))
    assert again == rows
    assert [p.stat().st_mtime_ns for p in samples] == stamps


def test_cli_evaluate_names_a_folder_without_attacks(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["evaluate", "--run", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no attack folders" in result.stderr


def test_identical_model_states_across_attacks_are_sampled_once(world_model, tmp_path, monkeypatch):
    from diffimmune.eval.sampling import weights_fingerprint
    from diffimmune.models.diffusion_model import DiffusionModel

    for method in ("lora", "full"):
        config = AttackConfig(
            method=method,
            learning_rate=1e-3,
            steps=1,
            batch_size=2,
            num_images=4,
            data="world:shape=heart",
            save_at=[0],
        )
        run_attack(
            world_model, config, tmp_path / "run" / method, progress=False, world=model_world(world_model)
        )
    generated = []
    original = DiffusionModel.generate

    def counting(self, prompts, **options):
        generated.extend(prompts)
        return original(self, prompts, **options)

    monkeypatch.setattr(DiffusionModel, "generate", counting)
    settings = EvalSettings(samples=3, steps=3, references=8, other_concepts=1, fid=False)
    rows = read_metrics_csv(evaluate_run(tmp_path / "run", settings))
    # Step 0 of both attacks is the unchanged model: 2 concepts x 3 samples once, then each attack's step 1.
    assert len(generated) == 3 * 2 * 3
    at_zero = {}
    for row in rows:
        if row["step"] == 0:
            at_zero.setdefault((row["concept"], row["metric"]), set()).add(row["value"])
    assert at_zero and all(len(values) == 1 for values in at_zero.values())
    for method in ("lora", "full"):  # every checkpoint folder still holds its own samples for the report
        assert len(list((tmp_path / "run" / method / "steps").rglob("*.png"))) == 2 * 2 * 3
    before = weights_fingerprint(world_model)
    weight = next(iter(world_model.unet.parameters()))
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[0] += 1e-3
        changed = weights_fingerprint(world_model)
        weight.copy_(kept)  # the fixture is shared
    assert changed != before
