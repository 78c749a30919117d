"""Evaluation of attack runs: metrics at every saved step, in a long-format CSV, with cached samples."""

from __future__ import annotations

import pytest
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
    # `other_concepts_at: start`: the other shapes (and their FID) only at the first saved step.
    start = EvalSettings(samples=4, steps=3, references=8, other_concepts=2, other_concepts_at="start")
    read = {(r["step"], r["concept"]) for r in read_metrics_csv(evaluate_run(tmp_path / "run", start))}
    assert {concept for step, concept in read if step == 2} == {"shape=heart"}
    assert {concept for step, concept in read if step == 0} == {c for c, _ in metrics}
    assert sorted((tmp_path / "run" / "ti" / "steps").rglob("*.png")) == samples  # nothing new generated
    # An experiment's other target is not read among the other concepts: the next known shape takes its place.
    from diffimmune.eval.evaluate import evaluate_attack

    others = [s for s in model_world(world_model).known_shapes if s != "heart"]
    assert ("shape=" + others[0], "detection") in metrics
    rows = evaluate_attack(tmp_path / "run" / "ti", start, others_exclude=["shape=" + others[0]])
    assert {r["concept"] for r in rows} - {"safe"} == {"shape=heart", *(f"shape={s}" for s in others[1:3])}


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


def test_a_model_evaluated_as_it_is_reads_what_an_attacks_step_0_reads(fast_world, world_model, tmp_path):
    # `evaluate --model`: a release candidate read before any attack, beside the model it was made from.
    # Its rows are exactly the ones an attack's step 0 on the same model gets (same prompts and seeds).
    from diffimmune.eval.evaluate import evaluate_models
    from diffimmune.methods.uce import UCEConfig, erase_with_uce
    from diffimmune.models.diffusion_model import load_model

    model_dir = str(fast_world[1].model_dir)
    config = AttackConfig(method="lora", learning_rate=1e-3, steps=1, batch_size=2, num_images=2,
                          data="world:shape=star", save_at=[0])  # fmt: skip
    run_attack(world_model, config, tmp_path / "run" / "lora", progress=False, world=model_world(world_model))
    settings = EvalSettings(samples=4, steps=3, references=8, other_concepts=2)
    attacked = [r for r in read_metrics_csv(evaluate_run(tmp_path / "run", settings)) if r["step"] == 0]
    erased = load_model(model_dir)
    erase_with_uce(erased, UCEConfig(concepts=["star"]), tmp_path / "erased")
    path, table = evaluate_models(
        [model_dir, str(tmp_path / "erased")], tmp_path / "out", settings, ["shape=star"]
    )
    rows = read_metrics_csv(path)

    def values(rows, model):
        return {(r["concept"], r["metric"]): r["value"] for r in rows if r["model"] == model}

    sources = list(dict.fromkeys(r["model"] for r in rows))
    assert len(sources) == 2 and {r["attack"] for r in rows} == {"-"} and {r["step"] for r in rows} == {0}
    assert values(rows, sources[0]) == pytest.approx(values(attacked, attacked[0]["model"]), abs=1e-6)
    assert values(rows, sources[1]).keys() == values(rows, sources[0]).keys()
    assert table[0].startswith("| model | shape=star detection | kept concepts") and len(table) == 4
    assert "of 2 |" in table[2]  # two kept shapes read


@pytest.mark.parametrize(
    ("target", "column"),
    [
        ("heart", "shape"),
        ("shape=heart", "shape"),
        ("heart", "concept"),
        ("FOLDER::concept=heart", "concept"),
    ],
)
def test_the_model_table_finds_a_target_by_the_name_its_rows_carry(target, column):
    # The world names a bare target shape=heart, a folder's evaluation concept=heart: either way the
    # target gets its own column and is not counted among the kept concepts.
    from diffimmune.eval.evaluate import model_table

    def row(concept, value):
        return {
            "model": "m",
            "attack": "-",
            "step": 0,
            "concept": concept,
            "metric": "detection",
            "value": value,
        }

    rows = [row(f"{column}=heart", 0.25), row(f"{column}=arrow", 0.5), row(f"{column}=moon", 1.0)]
    table = model_table(rows, [target])
    assert table[0].startswith(f"| model | {column}=heart detection | kept concepts")
    assert table[2] == "| m | 25% | 75.0% of 2 | - |"


def test_cli_evaluate_model_needs_its_targets_and_one_of_run_or_model(fast_world, tmp_path):
    model_dir = str(fast_world[1].model_dir)
    result = CliRunner().invoke(app, ["evaluate", "--model", model_dir, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "needs its targets: pass --target" in result.stderr
    result = CliRunner().invoke(app, ["evaluate", "--model", model_dir, "--target", "shape=star"])
    assert result.exit_code == 2 and "--model needs --out" in result.stderr
    result = CliRunner().invoke(app, ["evaluate"])
    assert result.exit_code == 2 and "give --run (attack folders) or --model" in result.stderr
    assert not (tmp_path / "o").exists()
