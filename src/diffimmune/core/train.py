"""The one training loop: pre-training, erasing, immunizing and attacking all run through `train`.

It owns the optimiser and learning-rate schedule, gradient clipping, the progress bar, `metrics.jsonl`,
atomic checkpoints and resuming. The algorithm is a `step_fn(params, step, generator)` that returns the
loss (the loop differentiates it) or a `StepOutput` with its own gradients (hypergradient methods).
Each step's randomness comes from a generator seeded by (seed, step), so a run resumed from a checkpoint
draws exactly what the uninterrupted run drew and ends bitwise equal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from diffimmune.config import TrainConfig
from diffimmune.errors import DiffImmuneError
from diffimmune.files import ensure_writable_folder, write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest.json"


@dataclass
class StepOutput:
    """What a step that computes its own gradients returns."""

    loss: float
    grads: dict[str, Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    params: dict[str, Tensor]
    steps_run: int
    resumed_from: int
    last_metrics: dict[str, float]


StepFn = Callable[[dict[str, Tensor], int, torch.Generator], "Tensor | tuple[Tensor, dict] | StepOutput"]


def step_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_optimizer(params: list[Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
        )
    optimizer_type = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_type(
        params,
        lr=config.learning_rate,
        betas=config.adam_betas,
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )


def make_lr_schedule(optimizer, config: TrainConfig):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_schedule,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.steps,
    )


# ----------------------------------------------------------------------------- checkpoints
def _flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """Optimizer state as safetensors-ready tensors plus JSON for the rest (no pickle anywhere)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer_state(tensors: dict[str, Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entry in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": rest["param_groups"]}


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = checkpoint_root(out_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    folder = checkpoint_root(out_dir) / json.loads(pointer.read_text())["folder"]
    return folder if folder.is_dir() else None


def save_checkpoint(
    out_dir: Path, step: int, params: dict[str, Tensor], optimizer, lr_schedule, keep: int
) -> Path:
    from safetensors.torch import save_file

    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    temporary = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file(
        {n: p.detach().cpu().contiguous() for n, p in params.items()}, str(temporary / "params.safetensors")
    )
    optimizer_tensors, optimizer_rest = _flatten_optimizer_state(optimizer.state_dict())
    save_file(optimizer_tensors, str(temporary / "optimizer.safetensors"))
    state = {
        "step": step,
        "optimizer": optimizer_rest,
        "lr_schedule": lr_schedule.state_dict(),
        "saved_at": time.time(),
        # CPU float sums depend on how many threads split them: a resume matches an uninterrupted run to
        # the bit only at the same count (`load_checkpoint` warns otherwise).
        "threads": torch.get_num_threads(),
    }
    (temporary / "state.json").write_text(json.dumps(state, indent=2, default=float))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    write_json_atomic(root / LATEST_FILE, {"folder": name, "step": step})
    older = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p != final)
    for stale in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, params: dict[str, Tensor], optimizer, lr_schedule) -> int:
    from safetensors.torch import load_file

    from diffimmune.models.loading import check_safetensors_file

    for file in ("params.safetensors", "optimizer.safetensors"):
        check_safetensors_file(folder / file)
    values = load_file(str(folder / "params.safetensors"))
    missing = sorted(set(params) - set(values))
    if missing:
        raise DiffImmuneError(
            f"checkpoint {folder} lacks {missing[0]}; it belongs to another run: start without --resume"
        )
    with torch.no_grad():
        for name, tensor in params.items():
            tensor.copy_(values[name].to(tensor.device, tensor.dtype))
    state = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer_state(tensors, state["optimizer"]))
    lr_schedule.load_state_dict(state["lr_schedule"])
    saved_threads, threads = state.get("threads"), torch.get_num_threads()
    if saved_threads is not None and saved_threads != threads:
        logger.warning(
            "checkpoint %s was written with %d CPU threads and this run uses %d: on the CPU its numbers "
            "can differ in the last digits from a run that was never interrupted; pass --threads %d to "
            "match it",
            folder,
            saved_threads,
            threads,
            saved_threads,
        )
    return int(state["step"])


# ----------------------------------------------------------------------------- metrics and progress
class MetricsLog:
    """`metrics.jsonl`, one JSON object per logged step; on resume, entries past the checkpoint go."""

    def __init__(self, path: Path | None, resume_step: int):
        self.path = path
        if path is None:
            return
        kept = []
        if path.is_file() and resume_step > 0:
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, entry: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")


# The metrics that say how a bi-level run's game went (methods/bilevel.py): the adversaries' loss on the
# target data at their adapted weights (and per adapted model, target_loss_<view>), the share of those
# losses still within max_loss (target_active), the retain loss, and the catch-up steps taken.
GAME_METRICS = ("target_loss", "target_active", "retain_loss", "inner_catch_up")


def read_metrics(path: Path) -> list[dict]:
    """The entries of a `metrics.jsonl`, in order; a line that is not JSON raises ValueError naming it."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not JSON ({error.msg})") from None
    return entries


def metrics_summary(
    entries: list[dict], keys: tuple[str, ...] = GAME_METRICS
) -> dict[str, tuple[float, float, float]]:
    """Mean, min and max of each numeric key over the given log entries, for the keys they have; per-view
    keys that start with a key (target_loss_<view>) are summarised too."""
    names = sorted(
        {k for e in entries for k in e if any(k == key or k.startswith(key + "_") for key in keys)}
    )
    summary = {}
    for name in names:
        values = [e[name] for e in entries if isinstance(e.get(name), int | float)]
        if values:
            summary[name] = (sum(values) / len(values), min(values), max(values))
    return summary


def progress_bar(enabled: bool, description: str, total: int, completed: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
    task = progress.add_task(description, total=total, completed=completed, status="")
    return progress, task


# ----------------------------------------------------------------------------- the loop
def as_step_output(result, params: dict[str, Tensor]) -> StepOutput:
    if isinstance(result, StepOutput):
        return result
    metrics = {}
    if isinstance(result, tuple):
        result, metrics = result
    names = [n for n, p in params.items() if p.requires_grad]
    grads = torch.autograd.grad(result, [params[n] for n in names], allow_unused=True)
    return StepOutput(
        loss=float(result.detach()),
        grads={n: g for n, g in zip(names, grads, strict=True) if g is not None},
        metrics=metrics,
    )


def train(
    params: dict[str, Tensor],
    step_fn: StepFn,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    description: str = "training",
    on_step_end: Callable[[int, dict[str, Tensor]], None] | None = None,
    after_update: Callable[[dict[str, Tensor]], None] | None = None,
) -> TrainResult:
    """Optimise `params` (leaf tensors, updated in place) for `config.steps` steps of `step_fn`.

    With `out_dir`, checkpoints go to `out_dir/checkpoints/` every `checkpoint_every` steps and at the
    end, metrics to `out_dir/metrics.jsonl`; `resume=True` continues from the last checkpoint.
    `on_step_end(step, params)` runs after each update with the 1-based step count; `after_update(params)`
    runs right after each optimiser step, before the checkpoint (a projection of the updated tensors).
    """
    for name, tensor in params.items():
        if not tensor.is_leaf:
            raise DiffImmuneError(
                f"training parameter {name} is not a leaf tensor; pass the tensors to optimise"
            )
        tensor.requires_grad_(True)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        ensure_writable_folder(out, "run folder")
    tensors = list(params.values())
    optimizer = make_optimizer(tensors, config)
    lr_schedule = make_lr_schedule(optimizer, config)
    start = 0
    if resume and out is not None:
        folder = latest_checkpoint(out)
        if folder is not None:
            start = load_checkpoint(folder, params, optimizer, lr_schedule)
    log = MetricsLog(out / "metrics.jsonl" if out is not None else None, start)
    last_metrics: dict[str, float] = {}
    bar, task = progress_bar(progress, description, config.steps, start)
    began = time.perf_counter()
    with bar:
        for step in range(start, config.steps):
            generator = torch.Generator().manual_seed(step_seed(config.seed, step))
            output = as_step_output(step_fn(params, step, generator), params)
            if not math.isfinite(output.loss):
                raise DiffImmuneError(
                    f"{description}: loss became {output.loss} at step {step + 1}; lower the learning rate"
                )
            for name, tensor in params.items():
                tensor.grad = output.grads.get(name)
            grad_norm = None
            if config.grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(tensors, config.grad_clip))
            optimizer.step()
            if after_update is not None:
                with torch.no_grad():
                    after_update(params)
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                last_metrics = {
                    "step": done,
                    "loss": output.loss,
                    "lr": lr_schedule.get_last_lr()[0],
                    **({"grad_norm": grad_norm} if grad_norm is not None else {}),
                    **output.metrics,
                    "elapsed_s": round(time.perf_counter() - began, 3),
                }
                log.write(last_metrics)
                bar.update(task, status=f"loss {output.loss:.4f}")
            if out is not None and (done % config.checkpoint_every == 0 or done == config.steps):
                save_checkpoint(out, done, params, optimizer, lr_schedule, config.keep_checkpoints)
            if on_step_end is not None:
                on_step_end(done, params)
            bar.update(task, completed=done)
    for tensor in tensors:
        tensor.requires_grad_(False)
    return TrainResult(
        params=params, steps_run=config.steps - start, resumed_from=start, last_metrics=last_metrics
    )
