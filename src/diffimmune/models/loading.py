"""Checks that run before any weights are read: the path exists, is a diffusers model, holds only
safetensors (pickle refused unless asked for) and every safetensors file is intact.

Every failure here is a `DiffImmuneError` with one line naming the path and the fix, so that the CLI
never shows a traceback for a bad model path.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffimmune.errors import DiffImmuneError
from diffimmune.files import read_json

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
SINGLE_FILE_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors")


def looks_like_hub_id(text: str) -> bool:
    """`org/name` with no local meaning: the only case where a missing path may still be loadable."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def check_safetensors_file(path: Path) -> None:
    """Read the header and check the data it promises is there (catches truncation and garbage)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if keys:
                # Reading the last tensor touches the end of the file: a truncated file fails here.
                handle.get_slice(keys[-1])
    except Exception as error:  # safetensors raises its own error types and OSError
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DiffImmuneError(
            f"{path} is not a valid safetensors file ({first_line}); re-export or re-download it"
        ) from None
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_length + end > size:
        raise DiffImmuneError(f"{path} is truncated ({size} bytes); re-export or re-download it")


def check_model_folder(path: Path, allow_pickle: bool) -> dict:
    """Validate a local diffusers folder and return its model_index.json."""
    if not path.exists():
        raise DiffImmuneError(f"model path {path} does not exist; pass a diffusers folder or a hub id")
    if path.is_file():
        if path.suffix in SINGLE_FILE_SUFFIXES:
            raise DiffImmuneError(
                f"{path} is a single-file checkpoint; convert it to a diffusers folder "
                "(diffusers' convert scripts) and pass the folder"
            )
        raise DiffImmuneError(f"model path {path} is a file; pass a diffusers model folder")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise DiffImmuneError(
            f"{path} is not a diffusers model (no model_index.json); pass a folder written by save_pretrained"
        )
    index = read_json(index_path, "re-export the model")
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = path / component
        if not folder.is_dir():
            raise DiffImmuneError(
                f"{path} lists component '{component}' but has no {component}/ folder; re-export the model"
            )
        weights = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles and not weights and not allow_pickle:
            raise DiffImmuneError(
                f"{pickles[0]} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to safetensors or pass --allow-pickle if you trust its source"
            )
        for weight_file in weights:
            check_safetensors_file(weight_file)
    return index
