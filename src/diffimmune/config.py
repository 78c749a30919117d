"""Validated configuration: one pydantic model per section of an experiment file.

`load_config(path, Model)` reads YAML or JSON and reports every validation error at once, each naming
its field, as one `DiffImmuneError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffimmune.errors import DiffImmuneError


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a config must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class TrainConfig(StrictModel):
    """How one training job runs (pre-training, erasing, immunizing and attacking all use it)."""

    steps: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    momentum: float = Field(default=0.0, ge=0)
    lr_schedule: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    keep_checkpoints: int = Field(default=1, gt=0)
    seed: int = 0


Model = TypeVar("Model", bound=BaseModel)


def format_validation_error(error: ValidationError, source: str) -> str:
    """Every problem on its own clause, each naming its dotted field path."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        problems.append(f"{field}: {item['msg']}")
    return f"{source}: {len(problems)} error(s): " + "; ".join(problems)


def validate_config(data: dict, model_type: type[Model], source: str = "config") -> Model:
    try:
        return model_type.model_validate(data)
    except ValidationError as error:
        raise DiffImmuneError(format_validation_error(error, source)) from None


def read_config_file(path: str | Path, what: str = "config file") -> dict:
    """The mapping a YAML or JSON file holds; one-line errors for a missing or malformed file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DiffImmuneError(f"{what} {path} does not exist; check the path")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        first = str(error).splitlines()[0]
        raise DiffImmuneError(
            f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first}"
        ) from None
    if not isinstance(data, dict):
        raise DiffImmuneError(f"{path} must hold a mapping of settings at the top level")
    return data


def load_config(path: str | Path, model_type: type[Model]) -> Model:
    return validate_config(read_config_file(path), model_type, str(path))


ATTACK_METHODS = ("lora", "dreambooth", "textual_inversion", "custom_diffusion", "full", "benign")


class AttackConfig(StrictModel):
    """One fine-tuning attack. The same schema drives the CLI, the evaluation sweeps and ResAlign's
    sampler of simulated fine-tunes."""

    method: Literal["lora", "dreambooth", "textual_inversion", "custom_diffusion", "full", "benign"]
    learning_rate: float = Field(gt=0)
    steps: int = Field(default=400, gt=0)
    batch_size: int = Field(default=4, gt=0)
    rank: int = Field(default=4, gt=0)
    alpha: float | None = Field(default=None, gt=0)
    lora_targets: str = "attn"
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    data: str = Field(description="world:<concept>, world:shape!=a,b, FOLDER or FOLDER::<concept>")
    num_images: int = Field(default=20, gt=0)
    prompt: str | None = Field(
        default=None, description="template with {token} and label fields; None: captions"
    )
    token: str = "sks"
    init_token: str | None = None
    prior_preservation: bool = False
    class_prompt: str | None = None
    num_class_images: int = Field(default=20, gt=0)
    prior_weight: float = Field(default=1.0, ge=0)
    benign_method: Literal["full", "lora"] = "lora"
    grad_clip: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    save_at: list[int] = [0, 50, 100, 200, 400]

    @property
    def adapter_name(self) -> str:
        return self.benign_method if self.method == "benign" else self.method

    def checkpoints(self) -> list[int]:
        """The saved steps that this run reaches, always including 0 and the last."""
        return sorted({0, self.steps, *(s for s in self.save_at if 0 <= s <= self.steps)})
