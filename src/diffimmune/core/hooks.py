"""Capturing intermediate activations by module name (GIFT's representation noising, diagnostics).

Owns `capture_activations`, a context manager that registers forward hooks on the submodules whose
qualified names match glob patterns and always removes them again. The hooks are module hooks, so they
fire under ``torch.func.functional_call`` as well as under an ordinary call, and the captured tensors
keep their autograd graph.

Pattern syntax: fnmatch-style globs on the full dotted name, except that ``*`` and ``?`` stay inside one
dotted segment (so ``down_blocks.*.resnets.*`` captures the resnet blocks, not every layer inside them)
and ``**`` spans any number of segments. ``[seq]`` works as in fnmatch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from torch import Tensor, nn

from diffimmune.errors import DiffImmuneError

__all__ = ["capture_activations", "match_module_names"]


def match_module_names(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The qualified names of ``module``'s submodules matching any pattern, in ``named_modules`` order.

    Raises DiffImmuneError for a pattern that matches nothing, naming a few available modules.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise DiffImmuneError("capture_activations needs at least one module-name pattern, got none")
    names = [name for name, _ in module.named_modules() if name]
    for pattern in patterns:
        if not any(_compile(pattern).fullmatch(name) for name in names):
            raise DiffImmuneError(
                f"module pattern {pattern!r} matches no submodule; available names include "
                f"{', '.join(_suggestions(names, pattern))}"
            )
    return [name for name in names if any(_compile(pattern).fullmatch(name) for pattern in patterns)]


@contextmanager
def capture_activations(module: nn.Module, patterns: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Yield a dict {module_name: output} filled by every forward pass inside the block.

    Tuple or list outputs keep their first tensor, mapping outputs (diffusers' ``BaseOutput``) their
    first tensor value. A module called several times in one forward keeps its last output. The hooks
    are removed on exit, also when the block raises.
    """
    selected = match_module_names(module, patterns)
    modules = dict(module.named_modules())
    activations: dict[str, Tensor] = {}
    handles = []
    try:
        for name in selected:
            handles.append(modules[name].register_forward_hook(_recorder(name, activations)))
        yield activations
    finally:
        for handle in handles:
            handle.remove()


def _recorder(name: str, activations: dict[str, Tensor]):
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        tensor = _first_tensor(output)
        if tensor is None:
            raise DiffImmuneError(
                f"module {name!r} returned {type(output).__name__} with no tensor to capture; "
                "choose a module that outputs a tensor"
            )
        activations[name] = tensor

    return hook


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    return None


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    """Translate a glob whose ``*`` stays within one dotted segment into a regular expression."""
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**", index):
            parts.append(".*")
            index += 2
            continue
        if char == "*":
            parts.append(r"[^.]*")
        elif char == "?":
            parts.append(r"[^.]")
        elif char == "[" and (end := pattern.find("]", index + 2)) != -1:
            body = pattern[index + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            parts.append("[" + ("^" if negate else "") + body.replace("\\", r"\\") + "]")
            index = end + 1
            continue
        else:
            parts.append(re.escape(char))
        index += 1
    return re.compile("".join(parts))


def _suggestions(names: list[str], pattern: str, limit: int = 6) -> list[str]:
    """Names sharing the pattern's first segment if any, else the top-level ones."""
    head = pattern.split(".", 1)[0]
    related = [name for name in names if _compile(head).fullmatch(name.split(".", 1)[0])]
    pool = related or [name for name in names if "." not in name] or names
    shown = pool[:limit]
    return shown + ["..."] if len(pool) > limit else shown
