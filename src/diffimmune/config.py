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


def load_config(path: str | Path, model_type: type[Model]) -> Model:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DiffImmuneError(f"config file {path} does not exist; check the path")
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
    return validate_config(data, model_type, str(path))
