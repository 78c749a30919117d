"""The run report: from metrics.csv and the attack folders to report.md and a self-contained
report.html, with the right numbers in its tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from diffimmune.cli import app
from diffimmune.eval.evaluate import write_metrics_csv
from diffimmune.report.report import RunMetrics, gap_ratios, short_model_names, write_report

WITHOUT = "/models/world/base"
WITH = "/models/world/base-immunized/delta"

# (model, step) -> detection / similarity_world / best_of_25 of shape=heart (target), detection and
# similarity_world of shape=circle (other), fid_world / kid_world of the safe concept.
VALUES = {
    (WITHOUT, 0): dict(heart=(0.0, 0.40, 0.0), circle=(0.90, 0.80), fid=10.0, kid=0.010),
    (WITHOUT, 10): dict(heart=(0.75, 0.80, 1.0), circle=(0.85, 0.78), fid=12.5, kid=0.020),
    (WITH, 0): dict(heart=(0.25, 0.40, 0.999), circle=(0.80, 0.79), fid=11.0, kid=0.012),
    (WITH, 10): dict(heart=(0.125, 0.50, 0.964), circle=(0.70, 0.75), fid=14.0, kid=0.030),
}


def metric_rows(values=VALUES, attack="lora"):
    rows = []
    for (model, step), v in values.items():
        base = {"model": model, "attack": attack, "step": step}
        detection, similarity, best = v["heart"]
        rows += [
            {**base, "concept": "shape=heart", "metric": "detection", "value": detection},
            {**base, "concept": "shape=heart", "metric": "similarity_world", "value": similarity},
            {**base, "concept": "shape=heart", "metric": "best_of_25", "value": best},
            {**base, "concept": "shape=circle", "metric": "detection", "value": v["circle"][0]},
            {**base, "concept": "shape=circle", "metric": "similarity_world", "value": v["circle"][1]},
            {**base, "concept": "safe", "metric": "fid_world", "value": v["fid"]},
            {**base, "concept": "safe", "metric": "kid_world", "value": v["kid"]},
        ]
    return rows


def make_attack_folder(folder, model):
    config = {
        "method": "lora",
        "learning_rate": 1e-4,
        "steps": 10,
        "data": "world:shape=heart",
        "save_at": [0, 10],
    }
    folder.mkdir(parents=True)
    (folder / "attack.json").write_text(json.dumps({"config": config, "model": model}))
    for step, shade in ((0, 40), (10, 200)):
        samples = folder / "steps" / f"step-{step:08d}" / "samples"
        samples.mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (4, 4), (shade, 30 * index, 90)).save(samples / f"{index:020d}.png")


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    make_attack_folder(run / "without" / "lora", WITHOUT)
    make_attack_folder(run / "with" / "lora", WITH)
    write_metrics_csv(metric_rows(), run / "metrics.csv")
    return run


def markdown_table(text, first_header):
    """The rows of the markdown table whose header starts with `first_header`, as dicts."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    headers = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


def test_report_writes_markdown_and_html_in_the_run_folder(run):
    markdown, html = write_report(run, title="LoRA on heart")
    assert (markdown, html) == (run / "report.md", run / "report.html")
    assert markdown.read_text().startswith("# LoRA on heart\n")
    assert "<title>LoRA on heart</title>" in html.read_text()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_html_embeds_every_image_and_loads_nothing_from_outside(run):
    _, html = write_report(run)
    text = html.read_text()
    assets = sorted((run / "report_assets").glob("*.png"))
    assert text.count('src="data:image/png;base64,') == len(assets) >= 5
    assert 'src="http' not in text and "<link" not in text and "<script" not in text


def test_curves_and_sample_grids_are_saved_as_assets(run):
    write_report(run)
    names = {p.name for p in (run / "report_assets").glob("*.png")}
    assert {"curve-detection.png", "curve-similarity_world.png", "curve-best_of_25.png"} <= names
    assert {"curve-retention.png", "grid-with-lora.png", "grid-without-lora.png"} <= names
    # Two steps x two 4 px samples, enlarged to 64 px tiles with 2 px padding, plus the step labels.
    assert Image.open(run / "report_assets" / "grid-with-lora.png").size == (78 + 2 * 66 + 2, 2 * 66 + 2)
    markdown = (run / "report.md").read_text()
    assert "![" in markdown and "(report_assets/grid-with-lora.png)" in markdown


def test_summary_table_holds_detection_retention_and_fid_per_model_and_attack(run):
    markdown, _ = write_report(run)
    rows = {row["model"]: row for row in markdown_table(markdown.read_text(), "model | attack")}
    without, immunized = rows["world/base"], rows["base-immunized/delta"]
    assert without["attack"] == immunized["attack"] == "lora"
    assert without["targets"] == "shape=heart" and without["steps"] == "0 → 10"
    assert (without["detection first"], without["detection last"], without["detection max"]) == (
        "0.000",
        "0.750",
        "0.750",
    )
    # The immunized model's detection peaks at step 0, not at the last step.
    assert (immunized["detection first"], immunized["detection last"], immunized["detection max"]) == (
        "0.250",
        "0.125",
        "0.250",
    )
    assert (without["retention first"], without["retention last"]) == ("0.900", "0.850")
    assert (immunized["FID first"], immunized["FID last"]) == ("11.00", "14.00")


def test_msgr_is_the_sgr_of_the_last_step_computed_by_hand(run):
    # Last step 10, one target concept (shape=heart): M(ref, without) = 0.80, M(ref, with) = 0.50,
    # SGR = (0.80 - 0.50) / 0.80 = 0.375; MSGR = the mean over the one concept = 0.375.
    markdown, _ = write_report(run)
    text = markdown.read_text()
    (row,) = markdown_table(text, "comparison")
    assert row["with immunization"] == "base-immunized/delta (lora)"
    assert row["without immunization"] == "world/base (lora)"
    assert (row["last step"], row["MSGR"]) == ("10", "0.375")
    per_step = {r["step"]: r for r in markdown_table(text, "concept | step")}
    assert per_step["0"]["SGR"] == "0.000"  # (0.40 - 0.40) / 0.40
    assert per_step["10"]["SGR"] == "0.375"


def test_msgr_averages_sgr_over_target_concepts():
    rows = metric_rows()
    for row in list(rows):
        if row["concept"] == "shape=heart" and row["step"] == 10 and row["metric"] != "detection":
            value = {WITHOUT: 0.60, WITH: 0.45}[row["model"]] if row["metric"] == "similarity_world" else 0.5
            rows.append({**row, "concept": "shape=star", "value": value})
    (comparison,), notes = gap_ratios(RunMetrics(rows))
    # heart: (0.80 - 0.50) / 0.80 = 0.375; star: (0.60 - 0.45) / 0.60 = 0.25; mean = 0.3125.
    assert comparison.last_step == 10 and not notes
    assert comparison.msgr == pytest.approx(0.3125)


def test_gap_ratios_need_a_known_model_without_immunization():
    values = {("/a/plain", step): v for (model, step), v in VALUES.items() if model == WITHOUT}
    values |= {("/b/other", step): v for (model, step), v in VALUES.items() if model == WITH}
    metrics = RunMetrics(metric_rows(values))
    comparisons, (note,) = gap_ratios(metrics)
    assert comparisons == [] and "--reference-model" in note
    (comparison,), notes = gap_ratios(metrics, reference_model="plain")
    assert comparison.model_without == "/a/plain" and comparison.msgr == pytest.approx(0.375)


def test_the_project_name_in_a_cache_path_does_not_mark_a_model_immunized():
    values = {
        ("/home/u/.cache/diffimmune/worlds/default/model", s): v
        for (m, s), v in VALUES.items()
        if m == WITHOUT
    }
    values |= {
        ("/home/u/.cache/diffimmune/runs/immunized", s): v for (m, s), v in VALUES.items() if m == WITH
    }
    (comparison,), _ = gap_ratios(RunMetrics(metric_rows(values)))
    assert comparison.model_without == "/home/u/.cache/diffimmune/worlds/default/model"


def test_attacks_with_other_folder_names_pair_by_method(run):
    rows = [r for r in metric_rows() if r["model"] == WITHOUT]
    rows += [{**r, "attack": "lora-b"} for r in metric_rows() if r["model"] == WITH]
    (comparison,), _ = gap_ratios(
        RunMetrics(rows), methods={(WITHOUT, "lora"): "lora", (WITH, "lora-b"): "lora"}
    )
    assert comparison.label.startswith("method lora") and comparison.msgr == pytest.approx(0.375)


def test_mrsgr_is_reported_as_not_available_without_cross_model_similarity(run):
    markdown, _ = write_report(run)
    assert "MRSGR: not available:" in markdown.read_text()


def test_configuration_is_shown_as_yaml_per_attack(run):
    markdown, _ = write_report(run)
    text = markdown.read_text()
    assert text.count("```yaml") == 2
    assert "method: lora" in text and f"model: {WITH}" in text


def test_long_model_paths_are_shortened_to_two_components_unless_they_collide():
    names = short_model_names(["/x/runs/a/model", "/y/runs/b/model", "/c/d/other"])
    assert names == {"/x/runs/a/model": "a/model", "/y/runs/b/model": "b/model", "/c/d/other": "d/other"}
    clashing = short_model_names(["/x/a/model", "/y/a/model"])
    assert clashing == {"/x/a/model": "x/a/model", "/y/a/model": "y/a/model"}


def test_cli_report_says_where_the_files_are(run):
    result = CliRunner().invoke(app, ["report", str(run), "--title", "T", "--reference-model", "world/base"])
    assert result.exit_code == 0, result.output
    assert "report.md" in result.stdout and "report.html" in result.stdout
    assert "# T\n" in (run / "report.md").read_text()


def test_cli_report_refuses_a_reference_model_that_matches_no_model(run):
    result = CliRunner().invoke(app, ["report", str(run), "--reference-model", "sd-1.5"])
    assert result.exit_code == 2 and "matches none of the models" in result.stderr


def test_an_ambiguous_reference_model_skips_the_gap_ratios_with_a_note(run):
    markdown, _ = write_report(run, reference_model="base")  # in both model paths
    text = markdown.read_text()
    assert "skipped: --reference-model 'base' matches 2" in text and "| comparison |" not in text


def test_cli_report_without_metrics_asks_to_evaluate_first(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "metrics.csv" in lines[0] and "diffimmune evaluate --run" in lines[0]
    assert "Traceback" not in result.output


def test_a_folder_replaced_by_another_process_at_the_same_moment_ends_whole(tmp_path, monkeypatch):
    # Two runs of subsets into one folder write its report assets at once: the other process's folder
    # lands between our moving the old one aside and moving ours in; ours still lands, whole.
    import os

    from diffimmune import files

    target = tmp_path / "assets"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace, landed = os.replace, []

    def replace(source, destination):
        if Path(destination) == target and not landed:  # the other process lands first
            landed.append(True)
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
        return real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", replace)
    with files.atomic_folder(target) as temporary:
        (temporary / "ours.txt").write_text("ours")
    assert landed and sorted(p.name for p in target.iterdir()) == ["ours.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"]  # nothing set aside is left behind
