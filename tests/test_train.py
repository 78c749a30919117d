"""The training loop: checkpoints, metrics, and a killed run that resumes to the same bits."""

from __future__ import annotations

import json

import pytest
import torch

from diffimmune.config import TrainConfig
from diffimmune.core.objective import Batch, diffusion_loss
from diffimmune.core.train import StepOutput, latest_checkpoint, train
from diffimmune.models.diffusion_model import DiffusionModel
from diffimmune.models.params import trainable_parameters

CONFIG = TrainConfig(
    steps=6,
    learning_rate=1e-3,
    lr_schedule="cosine",
    warmup_steps=2,
    grad_clip=0.5,
    log_every=1,
    checkpoint_every=2,
    seed=11,
)


class Killed(Exception):
    pass


def diffusion_step(model, data, kill_at=None):
    def step_fn(params, step, generator):
        if step == kill_at:
            raise Killed
        index = torch.randint(0, len(data), (2,), generator=generator).tolist()
        batch = Batch(x0=data.x0[index], prompts=[data.prompts[i] for i in index])
        return diffusion_loss(model, params, batch, generator)

    return step_fn


@pytest.fixture
def data(tiny_model):
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return Batch(
        tiny_model.encode_images(images), ["a red star", "a blue circle", "a green square", "a sks dog"]
    )


def run(tiny_sd_dir, data, out, kill_at=None, resume=False):
    model = DiffusionModel.from_pretrained(tiny_sd_dir, device="cpu")
    params = trainable_parameters(model, "attn")
    train(params, diffusion_step(model, data, kill_at), CONFIG, out_dir=out, resume=resume, progress=False)
    return {n: t.detach().clone() for n, t in params.items()}


def test_killed_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tiny_sd_dir, data, tmp_path):
    uninterrupted = run(tiny_sd_dir, data, tmp_path / "whole")
    with pytest.raises(Killed):
        run(tiny_sd_dir, data, tmp_path / "killed", kill_at=5)
    assert json.loads((tmp_path / "killed/checkpoints/latest.json").read_text())["step"] == 4
    resumed = run(tiny_sd_dir, data, tmp_path / "killed", resume=True)
    untouched_model = DiffusionModel.from_pretrained(tiny_sd_dir, device="cpu")
    assert any(not torch.equal(untouched_model.named_parameters()[n], t) for n, t in uninterrupted.items())
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_resume_at_another_thread_count_says_its_numbers_can_differ(tiny_sd_dir, data, tmp_path, caplog):
    threads = torch.get_num_threads()
    with pytest.raises(Killed):
        run(tiny_sd_dir, data, tmp_path / "killed", kill_at=3)
    state = json.loads((tmp_path / "killed/checkpoints/step-00000002/state.json").read_text())
    assert state["threads"] == threads
    torch.set_num_threads(threads + 1)
    try:
        with caplog.at_level("WARNING", logger="diffimmune.core.train"):
            run(tiny_sd_dir, data, tmp_path / "killed", resume=True)
    finally:
        torch.set_num_threads(threads)
    (warning,) = [r.getMessage() for r in caplog.records if "CPU threads" in r.getMessage()]
    assert f"written with {threads} CPU threads and this run uses {threads + 1}" in warning
    assert f"--threads {threads}" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffimmune.core.train"):  # the same count: nothing to say
        with pytest.raises(Killed):
            run(tiny_sd_dir, data, tmp_path / "again", kill_at=3)
        run(tiny_sd_dir, data, tmp_path / "again", resume=True)
    assert not [r for r in caplog.records if "CPU threads" in r.getMessage()]


def test_resume_without_checkpoint_starts_from_scratch_and_matches(tiny_sd_dir, data, tmp_path):
    fresh = run(tiny_sd_dir, data, tmp_path / "a")
    resumed = run(tiny_sd_dir, data, tmp_path / "b", resume=True)
    assert all(torch.equal(fresh[n], resumed[n]) for n in fresh)


def test_checkpoints_are_written_whole_and_old_ones_pruned(tiny_sd_dir, data, tmp_path):
    run(tiny_sd_dir, data, tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest.json", "step-00000006"]
    assert {p.name for p in latest_checkpoint(tmp_path / "run").iterdir()} == {
        "params.safetensors",
        "optimizer.safetensors",
        "state.json",
    }


def test_a_step_may_supply_its_own_gradients():
    weight = torch.zeros(3)
    target = torch.tensor([1.0, -2.0, 0.5])

    def step_fn(params, step, generator):
        grad = params["w"].detach() - target  # gradient of 0.5 ||w - target||^2
        return StepOutput(loss=float(0.5 * grad.pow(2).sum()), grads={"w": grad})

    config = TrainConfig(steps=200, learning_rate=0.1, optimizer="sgd", grad_clip=None)
    train({"w": weight}, step_fn, config, progress=False)
    assert torch.allclose(weight, target, atol=1e-4)


def test_a_diverging_loss_stops_with_a_clear_error():
    from diffimmune.errors import DiffImmuneError

    def step_fn(params, step, generator):
        return params["w"].sum() * float("inf")

    with pytest.raises(DiffImmuneError, match="lower the learning rate"):
        train({"w": torch.zeros(2)}, step_fn, TrainConfig(steps=3, learning_rate=0.1), progress=False)
