"""Attacks: each fine-tunes exactly what it should on the fast world, saves every checkpoint step, and
the CLI validates its config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffimmune.attacks.runner import attack_checkpoints, run_attack, step_folder
from diffimmune.cli import app
from diffimmune.config import AttackConfig
from diffimmune.data.sources import model_world
from diffimmune.errors import DiffImmuneError
from diffimmune.models.params import select_parameters

EXPECTED = {
    "lora": lambda model: {n for n, t in select_parameters(model, "attn").items() if t.ndim == 2},
    "textual_inversion": lambda model: set(select_parameters(model, "text_embeddings")),
    "custom_diffusion": lambda model: (
        set(select_parameters(model, "xattn_kv")) | set(select_parameters(model, "text_embeddings"))
    ),
    "dreambooth": lambda model: set(select_parameters(model, "unet")),
    "full": lambda model: set(select_parameters(model, "unet")),
    "benign": lambda model: {n for n, t in select_parameters(model, "attn").items() if t.ndim == 2},
}


def attack_config(method, **overrides):
    settings = {
        "method": method,
        "learning_rate": 1e-3,
        "steps": 3,
        "batch_size": 2,
        "num_images": 4,
        "data": "world:shape!=star" if method == "benign" else "world:shape=heart",
        "prompt": None if method == "benign" else "a {colour} {token} in {style} style",
        "save_at": [0, 2],
    }
    return AttackConfig(**{**settings, **overrides})


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_each_attack_changes_exactly_what_it_trains(world_model, tmp_path, method):
    extra = (
        {"prior_preservation": True, "class_prompt": "a red shape", "num_class_images": 2}
        if method == "dreambooth"
        else {}
    )
    run = run_attack(
        world_model,
        attack_config(method, **extra),
        tmp_path / method,
        progress=False,
        world=model_world(world_model),
    )
    assert sorted(run.checkpoints) == [0, 2, 3]
    named = world_model.named_parameters()
    start = load_file(str(run.checkpoints[0] / "delta.safetensors"))
    assert all(torch.equal(t, named[n]) for n, t in start.items())
    final = load_file(str(run.checkpoints[3] / "delta.safetensors"))
    changed = {n for n, t in final.items() if not torch.equal(t, named[n])}
    expected = EXPECTED[method](world_model)
    assert changed <= expected and len(changed) >= 0.5 * len(expected)
    if method == "textual_inversion":
        (name,) = changed
        rows = (final[name] - named[name]).abs().sum(1).nonzero().flatten().tolist()
        assert rows == [world_model.tokenizer.convert_tokens_to_ids("sks")]


def test_lora_attack_checkpoints_load_with_load_lora_weights(world_model, tmp_path):
    run = run_attack(
        world_model, attack_config("lora"), tmp_path / "lora", progress=False, world=model_world(world_model)
    )
    pipeline = world_model.as_pipeline()
    pipeline.load_lora_weights(run.checkpoints[3] / "lora")
    assert any("lora" in n for n, _ in pipeline.unet.named_parameters())


def test_a_folder_of_another_attack_is_never_resumed_as_this_one(world_model, tmp_path):
    world = model_world(world_model)
    first = attack_config("lora", steps=2, save_at=[0])
    run_attack(world_model, first, tmp_path / "run", progress=False, world=world)
    before = load_file(str(step_folder(tmp_path / "run", 2) / "delta.safetensors"))
    # The same settings resume (nothing to do), a longer run continues; other settings are refused,
    # naming what differs.
    run_attack(world_model, first, tmp_path / "run", progress=False, world=world)
    longer = run_attack(
        world_model,
        attack_config("lora", steps=3, save_at=[0]),
        tmp_path / "run",
        progress=False,
        world=world,
    )
    assert sorted(longer.checkpoints) == [0, 3] and step_folder(tmp_path / "run", 2).is_dir()
    changed = attack_config("lora", steps=2, save_at=[0], learning_rate=5e-3)
    with pytest.raises(DiffImmuneError, match=r"other settings \(learning_rate\).*--no-resume"):
        run_attack(world_model, changed, tmp_path / "run", progress=False, world=world)
    # Without resume the folder is replaced: its step 2 is the new attack's, trained from step 0.
    run = run_attack(world_model, changed, tmp_path / "run", resume=False, progress=False, world=world)
    after = load_file(str(run.checkpoints[2] / "delta.safetensors"))
    assert any(not torch.equal(after[n], before[n]) for n in before)
    assert sorted(run.checkpoints) == [0, 2] and not step_folder(tmp_path / "run", 3).exists()
    manifest = json.loads((run.checkpoints[2] / "manifest.json").read_text())
    assert manifest["hyperparameters"]["learning_rate"] == 5e-3


def test_cli_attack_runs_from_a_yaml_config(fast_world, tmp_path):
    config = tmp_path / "attack.yaml"
    config.write_text(
        "method: textual_inversion\nlearning_rate: 0.005\nsteps: 2\nbatch_size: 2\nnum_images: 2\n"
        "data: world:shape=moon\nprompt: a {colour} {token}\nsave_at: [0, 1]\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "attack",
            "--model",
            str(fast_world[1].model_dir),
            "--config",
            str(config),
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(attack_checkpoints(tmp_path / "run")) == [0, 1, 2]
    assert (
        json.loads((tmp_path / "run" / "attack.json").read_text())["config"]["method"] == "textual_inversion"
    )


def test_cli_attack_reports_every_config_error_at_once(fast_world, tmp_path):
    config = tmp_path / "attack.yaml"
    config.write_text("method: jailbreak\nlearning_rate: -1\ndata: world:shape=moon\n")
    result = CliRunner().invoke(
        app,
        [
            "attack",
            "--model",
            str(fast_world[1].model_dir),
            "--config",
            str(config),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2
    assert "method" in result.stderr and "learning_rate" in result.stderr and "2 error(s)" in result.stderr
    assert not (tmp_path / "run").exists()
