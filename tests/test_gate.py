"""The release gate over a run's metrics: a defence passes only when every saved step holds the targets and
the other concepts lose at most the allowed points against the reference; the best passing one is named."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from diffimmune.cli import app
from diffimmune.eval.evaluate import write_metrics_csv
from diffimmune.eval.gate import gate_run

runner = CliRunner()
STEPS = (0, 50, 100, 200, 400)


def make_run(tmp_path, curves: dict, kept: dict):
    """A run folder as `diffimmune run` leaves it: experiment.json and metrics.csv, with per-target attacks
    lr-star and lr-square; `curves[model][target]` is the target's detection per saved step and
    `kept[model]` the other shapes' detection at step 0. The square attack also reads the star (untaught)."""
    run = tmp_path / "run"
    folders = {"erased": run / "erase" / "uce-1a2b", "base": tmp_path / "world"}
    for name in curves:
        folders.setdefault(name, run / "immunize" / f"{name}-9f8e" / "delta")
    defences = {name: {"method": "mima"} for name in curves if name not in ("erased", "base")}
    experiment = {"name": "gate", "targets": ["star", "square"], "defences": defences}
    run.mkdir()
    (run / "experiment.json").write_text(json.dumps(experiment))
    rows = []
    for model, per_target in curves.items():
        for target, curve in per_target.items():
            attack = f"lr-{target}"
            for step, value in zip(STEPS, curve, strict=True):
                row = {"model": str(folders[model]), "attack": attack, "step": step, "metric": "detection"}
                rows.append({**row, "concept": f"shape={target}", "value": value})
                if target == "square":  # an untaught target read by this attack: not the star's curve
                    rows.append({**row, "concept": "shape=star", "value": 1.0})
            for other in ("circle", "ring"):
                rows.append(
                    {
                        "model": str(folders[model]),
                        "attack": attack,
                        "step": 0,
                        "metric": "detection",
                        "concept": f"shape={other}",
                        "value": kept[model],
                    }
                )
        rows.append(
            {
                "model": str(folders[model]),
                "attack": "other",
                "step": 400,
                "metric": "detection",
                "concept": "shape=star",
                "value": 1.0,
            }
        )
    write_metrics_csv(rows, run / "metrics.csv")
    return run


CURVES = {
    "erased": {"star": [0.1, 0.3, 0.6, 0.9, 0.95], "square": [0.2, 0.3, 0.6, 0.7, 0.8]},
    "holds": {"star": [0.0, 0.05, 0.1, 0.1, 0.15], "square": [0.1, 0.1, 0.2, 0.2, 0.25]},  # mean <= 20%
    "best": {"star": [0.0, 0.0, 0.05, 0.05, 0.1], "square": [0.0, 0.05, 0.05, 0.1, 0.1]},
    "leaks": {"star": [0.0, 0.0, 0.0, 0.1, 0.1], "square": [0.1, 0.1, 0.2, 0.4, 0.6]},
    "forgets": {"star": [0.0, 0.0, 0.0, 0.0, 0.0], "square": [0.0, 0.0, 0.0, 0.0, 0.0]},
}
KEPT = {"erased": 0.60, "holds": 0.58, "best": 0.57, "leaks": 0.61, "forgets": 0.40}


def test_gate_passes_only_models_that_hold_every_step_and_keep_the_other_concepts(tmp_path):
    run = make_run(tmp_path, CURVES, KEPT)
    result = gate_run(run, "lr")
    rows = {row.model: row for row in result.rows}
    assert [row.model for row in result.rows] == ["erased", "holds", "best", "leaks", "forgets"]
    assert rows["erased"].mean_detection[-1] == 0.875  # the star curve is the star attack's, not 100%
    assert rows["holds"].passes and rows["best"].passes
    assert not rows["leaks"].held and rows["leaks"].kept_enough  # the square comes back: 50% at step 400
    assert rows["forgets"].held and not rows["forgets"].kept_enough  # 20 points of the other shapes lost
    assert abs(rows["best"].drop_points - 3.0) < 1e-9
    assert result.chosen == "best"
    # Each target under the bound, not their mean: "holds" lets the square reach 25%.
    strict = gate_run(run, "lr", worst_target=True)
    assert {row.model for row in strict.rows[1:] if row.passes} == {"best"}
    # A tighter retention bound leaves none.
    assert gate_run(run, "lr", max_drop=1.5).chosen is None


def test_gate_command_prints_the_verdicts_writes_them_and_exits_1_when_none_passes(tmp_path):
    run = make_run(tmp_path, CURVES, KEPT)
    result = runner.invoke(app, ["gate", str(run), "--attack", "lr"])
    assert result.exit_code == 0, result.output
    assert "release: best" in result.output and "fail" in result.output
    written = json.loads((run / "gate-lr.json").read_text())
    assert written["chosen"] == "best"
    assert [r["passes"] for r in written["rows"]] == [False, True, True, False, False]
    result = runner.invoke(app, ["gate", str(run), "--attack", "lr", "--max-target", "5"])
    assert result.exit_code == 1 and "no immunized model passes" in result.output
    assert json.loads((run / "gate-lr.json").read_text())["chosen"] is None


def test_gate_bad_input_is_one_line(tmp_path):
    run = make_run(tmp_path, CURVES, KEPT)
    for args, expected in [
        (
            ["gate", str(run), "--attack", "lora"],
            "has no evaluation of attack 'lora'; its attacks: lr, other",
        ),
        (["gate", str(tmp_path), "--attack", "lr"], "experiment.json does not exist"),
        (["gate", str(run), "--attack", "lr", "--max-target", "120"], "--max-target is a percentage"),
        (["gate", str(run), "--attack", "lr", "--max-drop", "-1"], "--max-drop is the points"),
        (["gate", str(run), "--attack", "lr", "--reference", "base"], "--reference base: the run has no"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in " ".join(result.output.split()) and "Traceback" not in result.output


def test_gate_reads_the_other_concepts_from_an_evaluation_of_the_released_models(tmp_path):
    """`--retention`: the kept concepts come from `diffimmune evaluate --model` (every kept shape, before any
    attack) instead of the attacks' step 0; a model it did not read is a one-line error."""
    run = make_run(tmp_path, CURVES, KEPT)
    folders = {"erased": run / "erase" / "uce-1a2b"}
    folders |= {m: run / "immunize" / f"{m}-9f8e" / "delta" for m in CURVES if m != "erased"}
    kept = {"erased": 0.62, "holds": 0.50, "best": 0.60, "leaks": 0.62, "forgets": 0.61}
    rows = [
        {"model": str(folders[m]), "attack": "-", "step": 0, "metric": "detection", "concept": c, "value": v}
        for m, value in kept.items()
        for c, v in [("shape=circle", value), ("shape=ring", value), ("shape=star", 0.0)]
    ]
    path = write_metrics_csv(rows, tmp_path / "release" / "metrics.csv")
    result = gate_run(run, "lr", retention=path)
    verdicts = {row.model: row.passes for row in result.rows[1:]}
    assert verdicts == {
        "holds": False,
        "best": True,
        "leaks": False,
        "forgets": True,
    }  # 12 points lost; 1 kept
    assert result.chosen == "forgets"  # it holds both targets at 0%
    write_metrics_csv([r for r in rows if "best" not in r["model"]], path)
    answer = runner.invoke(app, ["gate", str(run), "--attack", "lr", "--retention", str(path)])
    assert answer.exit_code == 2 and "has no reading of best" in answer.output


def test_gate_refuses_a_model_whose_evaluation_lacks_a_target(tmp_path):
    """A model with one target's curve missing would be gated on the other alone: a one-line error instead."""
    curves = {**CURVES, "leaks": {"star": CURVES["leaks"]["star"]}}
    run = make_run(tmp_path, curves, KEPT)
    result = runner.invoke(app, ["gate", str(run), "--attack", "lr"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'lr' on leaks has no detection of shape=square" in " ".join(result.output.split())
