"""The command line: it works on good input, and bad input gets one line, exit code 2, no traceback,
nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffimmune.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "generate" in result.output and "info" in result.output


def test_threads_option_pins_torch_and_refuses_zero(tiny_sd_dir, monkeypatch):
    threads = torch.get_num_threads()
    wanted = 1 if threads != 1 else 2
    try:
        result = runner.invoke(app, ["--threads", str(wanted), "info", str(tiny_sd_dir)])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == wanted
        torch.set_num_threads(threads)
        monkeypatch.setenv("DIFFIMMUNE_THREADS", str(wanted))
        assert runner.invoke(app, ["info", str(tiny_sd_dir)]).exit_code == 0
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(threads)
    result = runner.invoke(app, ["--threads", "0", "info", str(tiny_sd_dir)])
    assert result.exit_code == 2
    assert "--threads must be >= 1" in result.output and "Traceback" not in result.output


def test_generate_writes_a_grid_with_a_row_per_prompt(tiny_sd_dir, tmp_path):
    out = tmp_path / "grids" / "grid.png"
    result = invoke(
        "generate",
        "--model",
        tiny_sd_dir,
        "-p",
        "a red star",
        "-p",
        "a blue circle",
        "--seeds",
        "3",
        "--steps",
        "2",
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    width, height = Image.open(out).size
    assert (width, height) == (3 * 18 + 2, 2 * 18 + 2)  # 16px tiles, 2px padding
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_info_describes_a_model_and_lists_a_selection(tiny_sd_dir):
    result = invoke("info", tiny_sd_dir, "--selection", "xattn_kv")
    assert result.exit_code == 0, result.output
    assert "latent (VAE)" in result.output
    assert "selection 'xattn_kv': 8 tensors" in result.output


def test_info_on_an_immunization_folder_summarises_the_game_over_the_second_half(tmp_path):
    train = tmp_path / "immunize" / "train"
    train.mkdir(parents=True)
    entries = [
        {"step": 10, "target_loss": 0.1, "target_loss_own_star": 0.1, "target_active": 1.0},
        {"step": 20, "target_loss": 0.2, "target_loss_own_star": 0.3, "target_active": 1.0},
        {"step": 30, "target_loss": 0.4, "target_loss_own_star": 0.5, "target_active": 0.0},
        {"step": 40, "target_loss": 0.8, "target_loss_own_star": 0.9, "target_active": 0.5},
    ]
    (train / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    result = runner.invoke(app, ["info", str(tmp_path / "immunize")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "logged steps" in result.output
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in result.output.splitlines()
        if line.count("│") == 3
    }
    assert rows["target_active, steps 30+"] == "mean 0.25 (min 0, max 0.5)"
    assert rows["target_loss, steps 30+"] == "mean 0.6 (min 0.4, max 0.8)"
    assert rows["target_loss_own_star, steps 30+"] == "mean 0.7 (min 0.5, max 0.9)"
    assert "retain_loss, steps 30+" not in rows  # not logged, not made up

    (train / "metrics.jsonl").write_text('{"step": 10}\n{"step": 20, "target')
    assert_one_line_error(invoke("info", tmp_path / "immunize"), "metrics.jsonl: line 2 is not JSON")


def test_missing_model_path(tmp_path):
    assert_one_line_error(invoke("info", tmp_path / "nope"), "does not exist")
    result = invoke("generate", "--model", tmp_path / "nope", "-p", "a red star", "--out", tmp_path / "g.png")
    assert_one_line_error(result, str(tmp_path / "nope"), "does not exist")
    assert not (tmp_path / "g.png").exists()


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "folder").mkdir()
    result = invoke(
        "generate", "--model", tmp_path / "folder", "-p", "a red star", "--out", tmp_path / "g.png"
    )
    assert_one_line_error(result, "not a diffusers model", "model_index.json")
    assert not (tmp_path / "g.png").exists()


@pytest.fixture
def model_copy(tiny_sd_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(tiny_sd_dir, target)
    return target


def test_corrupt_safetensors_file(model_copy, tmp_path):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = invoke("generate", "--model", model_copy, "-p", "a red star", "--out", tmp_path / "g.png")
    assert_one_line_error(result, str(weights))
    assert not (tmp_path / "g.png").exists()


def test_garbage_safetensors_file(model_copy):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00garbage" * 10)
    assert_one_line_error(invoke("info", model_copy), str(weights), "not a valid safetensors file")


def test_pickle_checkpoint_is_refused_unless_allowed(model_copy):
    from safetensors.torch import load_file

    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), model_copy / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    assert_one_line_error(
        invoke("info", model_copy), "pickle", "--allow-pickle", "diffusion_pytorch_model.bin"
    )
    allowed = invoke("info", model_copy, "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output


def test_unknown_parameter_selection(tiny_sd_dir):
    result = invoke("info", tiny_sd_dir, "--selection", "cross_attn")
    line = assert_one_line_error(result, "cross_attn")
    assert "xattn_kv" in line
    assert result.stdout == ""  # nothing printed before the error


def test_unwritable_output_folder(tiny_sd_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke("generate", "--model", tiny_sd_dir, "-p", "a red star", "--out", blocker / "grid.png")
    assert_one_line_error(result, str(blocker), "writable")
    assert blocker.read_text() == "not a folder"


def test_bad_seeds_option(tiny_sd_dir, tmp_path):
    result = invoke(
        "generate", "--model", tiny_sd_dir, "-p", "x", "--seeds", "a-b", "--out", tmp_path / "g.png"
    )
    assert_one_line_error(result, "--seeds")
