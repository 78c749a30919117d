"""The experiment pipeline: the whole file is validated first (every error at once), stages are cached by
the hash of what made them (editing one attack re-runs only that attack), a run killed in the attack
stage resumes to the same numbers, and `diffimmune run --dry-run` prints the plan without running it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from diffimmune.attacks.runner import read_attack
from diffimmune.cli import app
from diffimmune.errors import DiffImmuneError
from diffimmune.eval.evaluate import read_metrics_csv, target_concepts
from diffimmune.pipeline import (
    COMBINE_LOCK,
    DEMO_EXPERIMENT,
    STAGE_FILE,
    Stage,
    build_stages,
    combine_run,
    evaluation_file,
    load_experiment,
    run_experiment,
    validate_experiment,
)

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def tiny_experiment(model_dir) -> dict:
    """Two shapes of the fast world, UCE, a 2-step IMMA, two 2-step LoRA attacks, a tiny evaluation."""
    return {
        "name": "tiny",
        "model": str(model_dir),
        "targets": ["star"],
        "erase": {"method": "uce"},
        "defences": {
            "imma": {
                "method": "imma",
                "steps": 2,
                "batch_size": 2,
                "num_images": 4,
                "hypergradient": "first_order",
                "checkpoint_every": 1,
            }
        },
        "attacks": {
            "lora": {
                "method": "lora",
                "learning_rate": 3e-3,
                "steps": 4,
                "num_images": 4,
                "save_at": [0, 2, 4],
            },
            "lora_fast": {
                "method": "lora",
                "learning_rate": 1e-2,
                "steps": 2,
                "num_images": 4,
                "save_at": [0, 2],
            },
        },
        "evaluate": {"samples": 2, "steps": 2, "references": 4, "other_concepts": 1, "fid": False},
    }


def test_validation_reports_every_error_at_once_each_naming_its_field(fast_world, tmp_path):
    experiment = tiny_experiment(fast_world[1].model_dir)
    experiment["targets"] = ["star", "hexagon"]  # no such shape in the world
    experiment["defences"]["bad"] = {"method": "vaccine"}  # unknown method
    experiment["attacks"]["lora"]["learning_rate"] = -1.0
    experiment["attacks"]["folder"] = {
        "method": "lora",
        "learning_rate": 1e-3,
        "data": str(tmp_path / "missing"),
    }
    with pytest.raises(DiffImmuneError) as caught:
        validate_experiment(experiment, "exp.yaml")
    message = str(caught.value)
    assert "4 error(s)" in message
    assert "targets.1: the world has no shape 'hexagon'" in message
    assert "defences.bad.method" in message
    assert "attacks.lora.learning_rate" in message
    assert f"attacks.folder.data: image folder {tmp_path / 'missing'} does not exist" in message
    assert "\n" not in message


def test_top_level_errors_come_with_the_sections_errors(tmp_path):
    experiment = {"targets": [], "attacks": {"a": {"method": "lora", "learning_rate": 0}}, "colour": 1}
    with pytest.raises(DiffImmuneError) as caught:
        validate_experiment(experiment)
    message = str(caught.value)
    assert "targets" in message and "colour" in message and "attacks.a.learning_rate" in message


def test_the_cache_reruns_only_what_changed(fast_world, tmp_path):
    experiment = tiny_experiment(fast_world[1].model_dir)
    planned = sum(
        s.images
        for s in build_stages(validate_experiment(experiment), tmp_path / "run")
        if s.kind == "evaluate"
    )
    first = run_experiment(
        validate_experiment(experiment), tmp_path / "run", progress=False, log=lambda m: None
    )
    # The plan counts what is generated: every image is made once (shared samples, keyed by weights).
    made = list((tmp_path / "run" / "shared-samples").rglob("*.png"))
    assert planned == len(made) == 2 * (2 * 2 * 3 + 2 * 2 * 1)  # 2 models x (steps 0, 2, 4; step 2)
    kinds = [e.split(":")[0] for e in first.executed]
    # erase, immunize, 2 models x 2 attacks (each attacked and evaluated), report
    assert kinds.count("erase") == 1 and kinds.count("immunize") == 1
    assert kinds.count("attack") == 4 and kinds.count("evaluate") == 4 and kinds.count("report") == 1
    assert (tmp_path / "run" / "report.html").is_file()
    # Each attack folder's evaluation is found from the folder alone (its stage record and attack config).
    plan = validate_experiment(experiment)
    evaluations = [s for s in build_stages(plan, tmp_path / "run") if s.kind == "evaluate"]
    for stage in evaluations:
        config, _ = read_attack(stage.folder.parent)
        targets = [f"{c}={v}" for c, v in target_concepts(config, None)]
        assert evaluation_file(stage.folder.parent, plan.experiment.evaluate, targets) == stage.folder
        assert stage.folder.is_file()
    other = plan.experiment.evaluate.model_copy(update={"samples": 3})
    assert evaluation_file(evaluations[0].folder.parent, other, targets) != evaluations[0].folder
    with pytest.raises(DiffImmuneError, match="stage.json is missing"):
        evaluation_file(tmp_path, other, targets)

    again = run_experiment(
        validate_experiment(experiment), tmp_path / "run", progress=False, log=lambda m: None
    )
    assert again.executed == ["report:report"]

    experiment["attacks"]["lora_fast"]["learning_rate"] = 2e-2
    edited = run_experiment(
        validate_experiment(experiment), tmp_path / "run", progress=False, log=lambda m: None
    )
    assert sorted(edited.executed) == sorted(
        [
            "attack:erased / lora_fast",
            "evaluate:erased / lora_fast",
            "attack:imma / lora_fast",
            "evaluate:imma / lora_fast",
            "report:report",
        ]
    )
    summary = edited.summary()
    assert set(summary) == {"erased", "imma"}
    assert all(0 <= v["target_after_attack"] <= 1 for v in summary.values())


def test_a_run_killed_in_the_attack_stage_resumes_to_the_same_numbers(fast_world, tmp_path, monkeypatch):
    import diffimmune.attacks.runner as attack_runner
    from diffimmune.eval.evaluate import read_metrics_csv

    experiment = tiny_experiment(fast_world[1].model_dir)
    del experiment["defences"]
    del experiment["attacks"]["lora_fast"]
    straight = run_experiment(
        validate_experiment(experiment), tmp_path / "straight", progress=False, log=lambda m: None
    )

    real = attack_runner.run_attack

    def killed_after_two_steps(model, config, out_dir, **options):
        real(model, config.model_copy(update={"steps": 2}), out_dir, **options)
        raise KeyboardInterrupt  # the process dies between step 2 and step 3

    monkeypatch.setattr(attack_runner, "run_attack", killed_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(
            validate_experiment(experiment), tmp_path / "killed", progress=False, log=lambda m: None
        )
    monkeypatch.setattr(attack_runner, "run_attack", real)
    resumed = run_experiment(
        validate_experiment(experiment), tmp_path / "killed", progress=False, log=lambda m: None
    )
    assert resumed.executed == ["attack:erased / lora", "evaluate:erased / lora", "report:report"]

    def values(result):
        rows = read_metrics_csv(result.metrics_csv)
        return sorted((r["attack"], r["step"], r["concept"], r["metric"], r["value"]) for r in rows)

    assert values(resumed) == values(straight)


def test_dry_run_prints_the_plan_and_runs_nothing(fast_world, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment(fast_world[1].model_dir)))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "immunize  imma" in result.output and "2 training steps" in result.output
    # imma / lora: 3 saved steps x 2 samples x (1 target + 1 other concept); imma / lora_fast: its step 0
    # is imma's own, generated once for both attacks, so only step 2 counts
    assert "imma / lora " in result.output and "12 images generated" in result.output
    assert "4 images generated" in result.output
    assert not (tmp_path / "run" / "erase").exists()


def test_run_with_a_bad_file_exits_with_one_line(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("targets: [star]\nattacks: {a: {method: lora, learning_rate: -1}}\n")
    result = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2
    assert "attacks.a.learning_rate" in result.output
    assert "Traceback" not in result.output


def test_run_takes_a_subset_of_the_files_defences_and_attacks(fast_world, tmp_path):
    experiment = tiny_experiment(fast_world[1].model_dir)
    experiment["defences"]["imma_b"] = dict(experiment["defences"]["imma"], steps=3)
    experiment["attack_models"] = ["erased", "imma", "imma_b"]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment))
    args = ["run", str(path), "--out", str(tmp_path / "run"), "--dry-run"]
    whole = runner.invoke(app, args)
    assert whole.exit_code == 0, whole.output
    assert "immunize  imma_b" in whole.output and "imma / lora_fast" in whole.output
    result = runner.invoke(app, [*args, "--defences", "imma_b", "--attacks", "lora"])
    assert result.exit_code == 0, result.output
    assert "immunize  imma_b" in result.output and "3 training steps" in result.output
    assert "immunize  imma " not in result.output and "imma / lora" not in result.output
    assert "erased / lora" in result.output and "imma_b / lora" in result.output
    assert "lora_fast" not in result.output
    # the subset's stages are the whole file's own (same configuration, same cache keys); only the
    # report, which reads every stage, is its own
    plan = load_experiment(path, ["imma_b"], ["lora"])
    assert plan.attack_models == ["erased", "imma_b"] and [a.name for a in plan.attacks] == ["lora"]

    def keys(plan):
        return {s.key for s in build_stages(plan, tmp_path / "run") if s.kind != "report"}

    assert keys(plan) < keys(load_experiment(path))


def test_a_run_attacking_only_immunized_models_ends_with_its_report(fast_world, tmp_path):
    # The erased model is the report's reference only when it was attacked: a file whose attack_models
    # names the defence alone used to fail at the last stage ("--reference-model ... matches none").
    experiment = tiny_experiment(fast_world[1].model_dir)
    experiment["attack_models"] = ["imma"]
    experiment["attacks"] = {"lora_fast": experiment["attacks"]["lora_fast"]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert {Path(r["model"]).parts[-2].rsplit("-", 1)[0] for r in rows} == {"imma"}
    assert "lora_fast" in (tmp_path / "run" / "report.md").read_text()


def test_runs_of_subsets_into_one_folder_keep_every_row_done_in_its_report(fast_world, tmp_path, monkeypatch):
    experiment = tiny_experiment(fast_world[1].model_dir)
    # imma_b immunizes the erased model with the anchor made from the model before the erasure ("base")
    anchored = {"anchor_weight": 1.0, "anchor_reference": "base", "retain_sampler_steps": 2}
    experiment["defences"]["imma_b"] = dict(experiment["defences"]["imma"], steps=1, **anchored)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment))
    out = tmp_path / "run"

    def models_in_metrics():  # (the model's stage folder, the attack) of every row of the run's metrics
        rows = read_metrics_csv(out / "metrics.csv")
        folders = {r["model"]: Path(r["model"]).relative_to(out.resolve()).parts[1] for r in rows}
        return {(folders[r["model"]].rsplit("-", 1)[0], r["attack"]) for r in rows}

    first = runner.invoke(
        app, ["run", str(path), "--out", str(out), "--defences", "imma", "--attacks", "lora"]
    )
    assert first.exit_code == 0, first.output
    assert models_in_metrics() == {("uce", "lora"), ("imma", "lora")}
    # The file is edited while the second subset runs (here: broken, after its stages): the run combines
    # its files from the file as it read it at the start.
    import diffimmune.cli

    run_plan = diffimmune.cli._run_plan
    original_text = path.read_text()

    def run_then_edit(*args, **kwargs):
        result = run_plan(*args, **kwargs)
        path.write_text(original_text.replace("steps: 2", "stepz: 2"))
        return result

    monkeypatch.setattr(diffimmune.cli, "_run_plan", run_then_edit)
    second = runner.invoke(
        app, ["run", str(path), "--out", str(out), "--defences", "imma_b", "--attacks", "lora"]
    )
    assert second.exit_code == 0, second.output
    monkeypatch.setattr(diffimmune.cli, "_run_plan", run_plan)
    path.write_text(original_text)
    # the second subset's files keep the first's rows (done, cached); lora_fast never ran, so it is absent
    assert models_in_metrics() == {("uce", "lora"), ("imma", "lora"), ("imma_b", "lora")}
    assert set(json.loads((out / "experiment.json").read_text())["defences"]) == {"imma", "imma_b"}
    (record,) = [json.loads(p.read_text()) for p in out.glob("immunize/imma_b-*/immunize.json")]
    assert record["config"]["anchor_reference"] == str(fast_world[1].model_dir)
    report = (out / "report.md").read_text()
    assert "imma_b" in report and "lora_fast" not in report
    # A subset run finishing while another rewrites the combined files waits for it, and then reads the
    # stages after the other's write (held here by hand: the rewrite does not start within the timeout).
    from filelock import FileLock, Timeout

    with FileLock(str(out / COMBINE_LOCK)), pytest.raises(Timeout):
        combine_run(path, out, timeout=0.2)
    (out / "metrics.csv").unlink()
    combine_run(path, out, timeout=0.2)
    assert models_in_metrics() == {("uce", "lora"), ("imma", "lora"), ("imma_b", "lora")}
    # The release gate reads the run's models by their names in the file, the erased one as reference.
    from diffimmune.eval.gate import gate_run

    gated = gate_run(out, "lora")
    assert [row.model for row in gated.rows] == ["erased", "imma", "imma_b"]
    assert all(row.steps == [0, 2, 4] and row.kept is not None for row in gated.rows)


def test_a_stage_another_run_is_working_on_is_waited_for_and_not_done_twice(tmp_path):
    """Two runs into one folder: the second reaches a stage while the first holds it, waits, and then finds
    it done instead of training into the same folder."""
    import threading
    import time

    stage = Stage(
        "attack", "erased / lora", tmp_path / "attacks" / "erased-1a" / "lora", "1a", training_steps=4
    )
    locks = tmp_path / ".locks"
    events = []

    def first():
        with stage.claimed(locks) as todo:
            events.append(("first", todo))
            time.sleep(0.5)
            stage.folder.mkdir(parents=True)
            (stage.folder / STAGE_FILE).write_text(json.dumps({"key": stage.key}))
            events.append(("first done", time.monotonic()))

    def second():
        with stage.claimed(locks) as todo:
            events.append(("second", todo, time.monotonic()))

    one = threading.Thread(target=first)
    one.start()
    time.sleep(0.1)
    two = threading.Thread(target=second)
    two.start()
    one.join()
    two.join()
    assert events[0] == ("first", True)
    first_done = events[1][1]
    (_, todo, entered) = events[2]
    assert todo is False and entered >= first_done
    with stage.claimed(locks) as todo:  # done: nothing to claim
        assert todo is False


def test_run_refuses_a_name_the_file_does_not_have(fast_world, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment(fast_world[1].model_dir)))
    result = runner.invoke(app, ["run", str(path), "--dry-run", "--defences", "imma,gift"])
    assert result.exit_code == 2
    assert "'gift'" in result.output and "known: imma" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(DiffImmuneError, match="known: lora, lora_fast"):
        load_experiment(path, None, ["lora2"])
    # An error in an entry the subset leaves out stops the run before any stage (its combined files are
    # written from the whole file).
    experiment = tiny_experiment(fast_world[1].model_dir)
    experiment["attacks"]["lora_fast"]["learning_rat"] = 1e-2
    path.write_text(yaml.safe_dump(experiment))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "--attacks", "lora"])
    assert result.exit_code == 2
    assert "attacks.lora_fast.learning_rat" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    with pytest.raises(DiffImmuneError, match="--attacks is empty"):
        load_experiment(path, None, [])


def test_other_concepts_at_start_costs_fewer_images_and_keeps_earlier_evaluations_cached(
    fast_world, tmp_path
):
    from diffimmune.pipeline import EvaluateSpec, evaluation_key

    assert "other_concepts_at" not in evaluation_key(EvaluateSpec())  # runs cached before the field stay so
    assert evaluation_key(EvaluateSpec(other_concepts_at="start"))["other_concepts_at"] == "start"
    experiment = tiny_experiment(fast_world[1].model_dir)

    def images(evaluate):
        experiment["evaluate"] = dict(experiment.get("evaluate", {}), **evaluate)
        stages = build_stages(validate_experiment(experiment), tmp_path)
        return {s.name: s.images for s in stages if s.kind == "evaluate"}

    every, start = images({"other_concepts_at": "every"}), images({"other_concepts_at": "start"})
    assert every.keys() == start.keys() and all(start[n] < every[n] for n in every)


def test_a_per_target_attack_reads_the_experiments_kept_shapes_and_not_its_sibling_target(fast_world):
    from diffimmune.pipeline import _evaluation_sets

    experiment = tiny_experiment(fast_world[1].model_dir)
    experiment["attacks"] = {"lora": dict(experiment["attacks"]["lora"], per_target=True)}
    experiment["targets"] = ["star", "square"]
    experiment["evaluate"]["other_concepts"] = 3
    plan = validate_experiment(experiment)
    attacks = {a.name: a for a in plan.attacks}
    assert attacks["lora-star"].others_exclude == ["shape=square"]
    assert attacks["lora-square"].others_exclude == ["shape=star"]
    kept = [s for s in plan.world.known_shapes if s not in ("star", "square")][:3]
    for target in ("star", "square"):
        read = {w[0] for w in _evaluation_sets(plan, attacks[f"lora-{target}"], plan.experiment.evaluate)}
        assert read == {f"shape={target}", *(f"shape={s}" for s in kept)}
    # the exclusion is a part of the evaluation's name only when there is one: a one-target run keeps its cache
    assert not validate_experiment(dict(experiment, targets=["star"])).attacks[0].others_exclude


def test_stage_folders_are_keyed_by_the_configuration(fast_world, tmp_path):
    experiment = tiny_experiment(fast_world[1].model_dir)
    before = {s.name: s.folder for s in build_stages(validate_experiment(experiment), tmp_path)}
    experiment["defences"]["imma"]["steps"] = 3
    after = {s.name: s.folder for s in build_stages(validate_experiment(experiment), tmp_path)}
    assert before["erased"] == after["erased"]
    assert before["imma"] != after["imma"]
    assert before["erased / lora"] == after["erased / lora"]
    assert before["imma / lora"] != after["imma / lora"]  # downstream of the changed defence


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_file_validates(path):
    from diffimmune.pipeline import load_experiment

    if path.name.startswith("sd15"):  # needs a GPU machine's captioned folder: only that may be missing
        with pytest.raises(DiffImmuneError, match=r"1 error\(s\): data: image folder .* does not exist"):
            load_experiment(path)
        return
    plan = load_experiment(path)
    assert plan.experiment.defences and plan.experiment.attacks


def test_the_shipped_demo_config_is_the_demo():
    shipped = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert shipped == DEMO_EXPERIMENT


def test_demo_dry_run_prints_its_plan_without_building_anything(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "targets star, square" in result.output
    assert "immunize  mima" in result.output and "150 training steps" in result.output
    assert not (tmp_path / "demo").exists()


def test_a_later_immunize_field_at_its_old_value_leaves_cached_stage_hashes_alone():
    from diffimmune.methods.common import ImmunizeConfig
    from diffimmune.pipeline import immunize_key

    config = ImmunizeConfig(method="mima", concepts=["world:shape=star"], retain_weight=1.0)
    added = (
        "retain_loss",
        "retain_unconditional",
        "merge_others",
        "retain_sampling",
        "retain_refresh",
        "retain_states",
        "retain_sampler_steps",
        "retain_guidance_scale",
        "outer_models",
        "inner_optimizer",
        "retain_rollout_steps",
        "retain_projection",
        "retain_projection_samples",
        "retain_projection_target_words",
        "inner_catch_up",
        "inner_restart",
        "average_from",
        "anchor_weight",
        "anchor_refresh",
        "anchor_selection",
        "anchor_reference",
    )
    assert not set(added) & set(immunize_key(config))  # what runs before the fields hashed
    assert immunize_key(config) == {k: v for k, v in config.model_dump(mode="json").items() if k not in added}
    distilled = ImmunizeConfig(
        method="mima", concepts=["world:shape=star"], retain_loss="distill", retain_unconditional=True
    )
    assert immunize_key(distilled)["retain_loss"] == "distill"
    assert immunize_key(distilled)["retain_unconditional"] is True
    adam = ImmunizeConfig(method="mima", concepts=["world:shape=star"], inner_optimizer="adam")
    assert immunize_key(adam)["inner_optimizer"] == "adam"
    caught = ImmunizeConfig(method="mima", concepts=["world:shape=star"], max_loss=0.3, inner_catch_up=5)
    assert immunize_key(caught)["inner_catch_up"] == 5
    restarted = ImmunizeConfig(method="mima", concepts=["world:shape=star"], inner_restart=25)
    assert immunize_key(restarted)["inner_restart"] == 25
    averaged = ImmunizeConfig(method="mima", concepts=["world:shape=star"], average_from=100)
    assert immunize_key(averaged)["average_from"] == 100
    projected = ImmunizeConfig(method="mima", concepts=["world:shape=star"], retain_projection=0.9)
    assert immunize_key(projected)["retain_projection"] == 0.9
    worded = projected.model_copy(update={"retain_projection_target_words": True})
    assert immunize_key(worded)["retain_projection_target_words"] is True


def one_line_errors(experiment: dict, count: int) -> str:
    """The validation error of an experiment that has `count` problems, checked to be one line."""
    with pytest.raises(DiffImmuneError) as caught:
        validate_experiment(experiment, "exp.yaml")
    message = str(caught.value)
    assert f"{count} error(s)" in message and "\n" not in message
    return message


def test_per_target_attacks_teach_with_the_tokens_the_defence_immunized(fast_world):
    """`tokens` gives each per-target attack its own placeholder (the ones a defence's `tokens` named);
    without it every target is taught with the attack's default token. Wrong uses get one line each."""
    from diffimmune.pipeline import _evaluation_sets

    experiment = tiny_experiment(fast_world[1].model_dir)
    experiment["targets"] = ["heart", "moon"]
    experiment["defences"] = {}
    experiment["attacks"] = {
        "lora": {"preset": "lora", "steps": 2, "tokens": ["<v1>", "<v2>"]},
        "dreambooth": {"preset": "dreambooth", "steps": 2},
    }
    plan = validate_experiment(experiment)
    tokens = {attack.name: attack.config.token for attack in plan.attacks}
    assert tokens == {
        "lora-heart": "<v1>",
        "lora-moon": "<v2>",
        "dreambooth-heart": "sks",
        "dreambooth-moon": "sks",
    }
    lora_moon = next(a for a in plan.attacks if a.name == "lora-moon")
    sets = _evaluation_sets(plan, lora_moon, plan.experiment.evaluate)
    assert [key[2] for key in sets if key[0] == "shape=moon"] == ["<v2>"]  # generated with its token

    experiment["attacks"] = {
        "short": {"preset": "lora", "steps": 2, "tokens": ["<v1>"]},
        "both": {"preset": "lora", "steps": 2, "token": "sks", "tokens": ["<v1>", "<v2>"]},
        "pooled": {"method": "lora", "learning_rate": 1e-3, "steps": 2, "tokens": ["<v1>", "<v2>"]},
        "arrow": {"preset": "lora", "steps": 2, "data": "world:shape=star", "tokens": ["<v1>", "<v2>"]},
    }
    message = one_line_errors(experiment, 4)
    assert "attacks.short.tokens: give one placeholder token per target (2)" in message
    assert "attacks.both.tokens: give either token" in message
    assert "attacks.pooled.tokens: one token per target needs a per-target attack" in message
    assert "attacks.arrow.tokens: one token per target needs a per-target attack" in message

    # A placeholder the world's word-level tokenizer lacks (it would read as <unk>) is refused when the
    # file is read, for a defence and for an attack that prompts with its token; one whose prompts are
    # the captions (full fine-tuning) does not use its token.
    prompt = "a {colour} {token} in {style} style"
    experiment["defences"] = {
        "imma": {"method": "imma", "steps": 1, "prompt": prompt, "tokens": ["<v1>", "<v9>"]}
    }
    experiment["attacks"] = {
        "lora": {"preset": "lora", "steps": 2, "tokens": ["<v1>", "<heart>"]},
        "full": {"preset": "full", "steps": 2, "token": "<unused>"},
    }
    message = one_line_errors(experiment, 2)
    assert "defences.imma.tokens: the token '<v9>' is not a word of the model's tokenizer" in message
    assert "attacks.lora-moon: the token '<heart>' is not a word" in message
    assert "use one of its spare tokens (<v1>, <v2>, <v3>, <v4>, sks)" in message
