"""Where the images of a concept come from, named by one string (the `data` field of configs):

- `world:shape=heart` / `world:heart`: drawn fresh from the concept world stored beside a world model;
- `world:shape!=star,heart`: the world without those concepts (benign data);
- `FOLDER` or `FOLDER::shape=heart`: any captioned image folder, optionally one concept of it.

`load_concept_data` returns images in [0,1], their captions and labels, deterministically per seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffimmune.data.concepts import ConceptSet
from diffimmune.errors import DiffImmuneError

WORLD_PREFIX = "world:"


@dataclass
class ConceptData:
    images: torch.Tensor  # [N,3,H,W] in [0,1]
    captions: list[str]
    labels: list[dict[str, str]]

    def prompts(self, template: str | None, token: str = "sks") -> list[str]:
        """The captions, or `template` filled with each image's labels and the placeholder token."""
        if template is None:
            return list(self.captions)
        try:
            return [template.format(token=token, **labels) for labels in self.labels]
        except KeyError as error:
            raise DiffImmuneError(
                f"prompt '{template}' uses {{{error.args[0]}}}, which the data has no label for; "
                f"use {{token}} or one of {sorted(self.labels[0]) if self.labels else []}"
            ) from None


def parse_filter(text: str, default_column: str = "shape") -> tuple[str, bool, list[str]]:
    """`shape=heart`, `shape!=star,heart` or a bare `heart` -> (column, negate, values)."""
    negate = "!=" in text
    if "=" in text:
        column, values = text.split("!=" if negate else "=", 1)
    else:
        column, values = default_column, text
    values_list = [v.strip() for v in values.split(",") if v.strip()]
    if not column.strip() or not values_list:
        raise DiffImmuneError(f"data filter '{text}' must look like column=value[,value] or column!=value")
    return column.strip(), negate, values_list


def world_factors(world) -> dict[str, list[str]]:
    """The world's label columns and their values (what a `world:` filter can select)."""
    return {
        "shape": list(world.shapes),
        "style": list(world.styles),
        "colour": list(world.colours),
        "background": list(world.backgrounds),
    }


def world_data(world, text: str, count: int, seed: int) -> ConceptData:
    from diffimmune.data.world import sample_world

    column, negate, values = parse_filter(text)
    factors = world_factors(world)
    if column not in factors:
        raise DiffImmuneError(
            f"world data filter names '{column}'; the world's columns are {', '.join(factors)}"
        )
    unknown = [v for v in values if v not in factors[column]]
    if unknown:
        raise DiffImmuneError(f"world has no {column} '{unknown[0]}'; it has {', '.join(factors[column])}")
    chosen = [v for v in factors[column] if (v in values) != negate]
    if column == "shape" and negate:
        chosen = [v for v in chosen if v in world.known_shapes]  # benign data: what the model already knows
    records = sample_world(world, count, np.random.default_rng(seed), **{f"{column}s": chosen})
    images = torch.from_numpy(np.stack([r.image for r in records])).permute(0, 3, 1, 2).float() / 255
    return ConceptData(images, [r.caption for r in records], [dict(r.labels) for r in records])


def folder_data(spec: str, count: int, seed: int, size: int | None) -> ConceptData:
    folder, _, concept = spec.partition("::")
    concept_set = ConceptSet.from_folder(folder)
    if concept:
        concept_set = concept_set.select(concept)
    records = list(concept_set.records)
    order = np.random.default_rng(seed).permutation(len(records))[: min(count, len(records))]
    chosen = [records[i] for i in sorted(order)]
    subset = ConceptSet(concept_set.root, chosen, concept_set.label_columns)
    return ConceptData(subset.images(size=size), subset.prompts(), [dict(r.labels) for r in chosen])


def load_concept_data(
    spec: str, count: int, seed: int = 0, world=None, size: int | None = None
) -> ConceptData:
    """Resolve a data string; `world` is the WorldConfig of the model under attack (for `world:`)."""
    if spec.startswith(WORLD_PREFIX):
        if world is None:
            raise DiffImmuneError(
                f"data '{spec}' draws from the concept world, but the model is not a world model"
            )
        return world_data(world, spec[len(WORLD_PREFIX) :], count, seed)
    if not Path(spec.partition("::")[0]).exists():
        raise DiffImmuneError(
            f"data folder {spec.partition('::')[0]} does not exist; give a folder or world:<concept>"
        )
    return folder_data(spec, count, seed, size)


def world_folder_of(path: str | Path) -> Path | None:
    """The world model folder behind a model, delta or run folder (itself, or the base its chain of deltas
    was made on), else None."""
    import json

    folder = Path(path)
    for _ in range(16):  # a delta on a delta on ... a world model
        if (folder / "diffimmune" / "world.json").is_file():
            return folder
        if (folder / "delta" / "manifest.json").is_file():  # an immunization run folder
            folder = folder / "delta"
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            return None
        folder = Path(json.loads(manifest.read_text()).get("base_model", ""))
    return None


def world_model_folder(model) -> Path | None:
    """The world model folder behind a loaded `model`, else None."""
    return world_folder_of(model.source)


def concept_spec(concept: str, data: str | None, world) -> str | None:
    """A concept name as a data string: kept if it is one, `DATA::shape=x` with a folder, `world:shape=x`
    on a world model; None when there is nowhere to draw it from."""
    if concept.startswith(WORLD_PREFIX) or "::" in concept:
        return concept
    labelled = concept if "=" in concept else f"shape={concept}"
    if data is not None:
        return f"{data}::{labelled}"
    if world is not None:
        return f"{WORLD_PREFIX}{labelled}"
    return None


def model_world(model):
    """The WorldConfig stored beside a world model (or beside the base of a delta), else None."""
    from diffimmune.data.world import WorldConfig

    folder = world_model_folder(model)
    if folder is None:
        return None
    return WorldConfig.model_validate_json((folder / "diffimmune" / "world.json").read_text())
