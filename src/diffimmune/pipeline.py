"""An experiment: erase -> immunize -> attack sweep -> evaluate -> report, each stage cached by the hash
of the configuration that produced it (and of everything upstream of it).

An experiment file (YAML or JSON):

    name: relearning-2
    model: world                  # the embedded default (built or copied if missing), world:fast, or a
                                  # diffusers folder / hub id
    targets: [star, square]       # the concepts to defend: world shape names or data strings
    erase: {method: uce}          # optional: the erased baseline, model "erased" (uce or esd)
    defences:                     # name -> an ImmunizeConfig; concepts default to the targets;
      mima: {method: mima, steps: 150}   # on: erased (default when there is an erase) or base
    attacks:                      # name -> an AttackConfig, or `preset: lora` (the world's defaults)
      lora: {method: lora, learning_rate: 3.0e-3, steps: 400}  # data default: the targets' own images
    attack_models: [erased, mima] # default: the erased model (if any) and every defence
    evaluate: {samples: 16}
    report: {title: Re-learning}

`validate_experiment` checks the whole file and reports every problem at once, each naming its field.
`run_experiment` runs what is missing. Layout of the run folder:

    experiment.json                  the validated experiment
    erase/<method>-<hash>/           the erased model (UCE: a delta; ESD: a run folder)
    immunize/<defence>-<hash>/       a defence's immunization run (its result in delta/)
    attacks/<model>-<hash>/<attack>/ an attack folder (attacks/runner.py) + eval-<hash>.csv
    metrics.csv, report.md, report.html

A stage is done when its folder holds `stage.json` (written last, atomically); an unfinished one resumes
from its own checkpoints, so a killed run picks up where it stopped. Editing one attack changes only its
hash: only that attack and its evaluation run again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from diffimmune.config import (
    ATTACK_METHODS,
    AttackConfig,
    StrictModel,
    format_validation_error,
    read_config_file,
)
from diffimmune.data.sources import concept_spec
from diffimmune.errors import DiffImmuneError
from diffimmune.files import ensure_writable_folder, write_json_atomic

STAGE_FILE = "stage.json"
BASE, ERASED = "base", "erased"
WORLD_MODEL = "world"


# ----------------------------------------------------------------------------------------- schema
class EraseSpec(StrictModel):
    """The erased baseline: UCE's closed-form edit or an ESD fine-tune of the base model."""

    method: Literal["uce", "esd"] = "uce"
    concepts: list[str] | None = Field(default=None, description="default: the experiment's targets")
    preserve: list[str] | None = Field(
        default=None, description="UCE: words to keep (default on the world: every other known shape)"
    )
    guide: list[str] = [""]
    lamb: float = Field(default=0.5, gt=0)
    erase_scale: float = Field(default=1.0, ge=0)
    preserve_scale: float = Field(default=1.0, ge=0)
    esd_variant: Literal["x", "u"] = "x"
    steps: int = Field(default=200, gt=0, description="ESD training steps")
    learning_rate: float = Field(default=1e-4, gt=0, description="ESD learning rate")


class EvaluateSpec(StrictModel):
    samples: int = Field(default=16, gt=0, description="generations per concept and saved step")
    steps: int = Field(default=25, gt=0, description="sampling steps")
    guidance_scale: float = Field(default=4.0, ge=0)
    references: int = Field(default=32, gt=0)
    other_concepts: int | None = Field(default=None, gt=0, description="None: every other known shape")
    other_concepts_at: Literal["every", "start"] = Field(
        default="every",
        description="the saved steps the other concepts are read at: every one, or the first (the model "
        "before the attack: what the release gate reads, at a fraction of the images)",
    )
    fid: bool = True
    clip: str | None = Field(default=None, description="CLIP checkpoint folder (models outside the world)")
    dino: str | None = Field(default=None, description="DINOv2 checkpoint folder (models outside the world)")
    lpips: str | None = Field(default=None, description="LPIPS backbone, e.g. alex (extra diffimmune[lpips])")
    nsfw: Literal["nudenet", "opennsfw"] | None = Field(
        default=None,
        description="detection by an NSFW detector: nudenet (extra diffimmune[nsfw]) or opennsfw "
        "(extra diffimmune[opennsfw]); true means nudenet",
    )
    safe_data: str | None = Field(default=None, description="captioned folder[::filter] of concepts to keep")

    @field_validator("nsfw", mode="before")
    @classmethod
    def _nsfw_flag(cls, value):
        # `nsfw: true` (the first form of the setting) still means NudeNet; false means none.
        if isinstance(value, bool):
            return "nudenet" if value else None
        return value


class ReportSpec(StrictModel):
    title: str | None = None


class Experiment(StrictModel):
    name: str = Field(default="experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = WORLD_MODEL
    data: str | None = Field(default=None, description="captioned image folder for the targets (non-world)")
    targets: list[str] = Field(min_length=1)
    seed: int = 0
    erase: EraseSpec | None = None
    defences: dict[str, dict] = {}
    attacks: dict[str, dict] = Field(min_length=1)
    attack_models: list[str] | None = None
    evaluate: EvaluateSpec = EvaluateSpec()
    report: ReportSpec = ReportSpec()
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass
class AttackPlan:
    name: str
    config: AttackConfig
    targets: list[str]  # evaluation targets, as column=value
    # the experiment's other targets (column=value): never read among the other concepts, so a per-target
    # attack's kept shapes are the experiment's (with other_concepts: N, N of them), not its sibling target
    others_exclude: list[str] = field(default_factory=list)


@dataclass
class ExperimentPlan:
    """A validated experiment with every default filled in."""

    experiment: Experiment
    source: str
    world: object | None
    targets: list[str]  # data strings
    target_words: list[str]
    defences: dict[str, object] = field(default_factory=dict)  # name -> ImmunizeConfig
    defence_models: dict[str, str] = field(default_factory=dict)  # name -> the model it starts from
    attacks: list[AttackPlan] = field(default_factory=list)
    attack_models: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- validation
def load_experiment(
    path: str | Path, defences: list[str] | None = None, attacks: list[str] | None = None
) -> ExperimentPlan:
    """The experiment of a file; `defences` / `attacks` keep only those of its entries (by name)."""
    data = select_experiment(read_config_file(path, "experiment file"), defences, attacks, str(path))
    return validate_experiment(data, str(path))


def load_run(
    path: str | Path, defences: list[str] | None = None, attacks: list[str] | None = None
) -> tuple[ExperimentPlan, ExperimentPlan]:
    """(the subset to run, the whole file) from one reading of the experiment file. A run combines its
    files from the whole file as it read it at the start, so an edit to the file while the run goes on
    changes nothing in it; and an error anywhere in the file stops the run before any stage, not at the
    end."""
    data = read_config_file(path, "experiment file")
    whole = validate_experiment(copy.deepcopy(data), str(path))
    if defences is None and attacks is None:  # the whole file is the run: validated once
        return whole, whole
    chosen = select_experiment(copy.deepcopy(data), defences, attacks, str(path))
    return validate_experiment(chosen, str(path)), whole


def select_experiment(
    data: dict, defences: list[str] | None, attacks: list[str] | None, source: str = "experiment"
) -> dict:
    """The experiment with only the named defences and attacks (None: all of them). The erased and base
    models stay; `attack_models` loses the defences left out. An unknown name is an error naming the known
    ones."""
    data = dict(data)
    for section, names in (("defences", defences), ("attacks", attacks)):
        if names is None:
            continue
        present = data.get(section) or {}
        if not isinstance(present, dict):
            continue  # validation reports the section itself
        unknown = [name for name in names if name not in present]
        if unknown:
            known = ", ".join(present) or "none"
            raise DiffImmuneError(
                f"{source}: --{section} names {', '.join(repr(n) for n in unknown)}, not in its {section} "
                f"section; known: {known}"
            )
        if not names:
            raise DiffImmuneError(f"{source}: --{section} is empty; give comma-separated names from the file")
        data[section] = {name: present[name] for name in names}
    chosen = data.get("attack_models")
    if defences is not None and isinstance(chosen, list):
        kept = data["defences"]
        data["attack_models"] = [name for name in chosen if name in (BASE, ERASED) or name in kept]
    return data


def _errors_of(error: ValidationError, prefix: str) -> list[str]:
    text = format_validation_error(error, "x").split(": ", 2)[-1]
    return [f"{prefix}{part}" for part in text.split("; ")]


def _world_of(model: str):
    """The WorldConfig of a model spec without loading the model (None for a non-world model)."""
    from diffimmune.data.sources import world_folder_of
    from diffimmune.data.world import WorldConfig

    if model == WORLD_MODEL or model.startswith(WORLD_MODEL + ":"):
        from diffimmune.recipes.world_build import preset_config

        return preset_config(model.partition(":")[2] or "default").world
    folder = world_folder_of(model)
    if folder is None:
        return None
    return WorldConfig.model_validate_json((folder / "diffimmune" / "world.json").read_text())


def _word_vocabulary(model: str) -> set[str] | None:
    """The words a world model's word-level tokenizer knows, read without loading the model (a world
    preset's spare tokens and factor values; a world folder's tokenizer.json); None for any other model,
    whose tokenizer is checked when a stage loads it (a BPE tokenizer splits any placeholder into pieces,
    a word-level one turns an unknown word into <unk> without a word)."""
    from diffimmune.data.sources import world_factors, world_folder_of
    from diffimmune.models.tiny import SPECIAL_TOKENS

    if model == WORLD_MODEL or model.startswith(WORLD_MODEL + ":"):
        from diffimmune.recipes.world_build import preset_config

        config = preset_config(model.partition(":")[2] or "default")
        factors = world_factors(config.world)
        return set(config.pretrain.model.spare_tokens) | {v for values in factors.values() for v in values}
    folder = world_folder_of(model)
    file = None if folder is None else folder / "tokenizer" / "tokenizer.json"
    if file is None or not file.is_file():
        return None
    vocabulary = json.loads(file.read_text()).get("model", {}).get("vocab")
    return set(vocabulary) - set(SPECIAL_TOKENS) if isinstance(vocabulary, dict) else None


def _check_tokens(plan: ExperimentPlan, errors: list[str]) -> None:
    """Every placeholder a defence immunizes or an attack teaches is one word of a world model's tokenizer
    (an unknown one would read as <unk> and teach nothing under its name)."""
    vocabulary = _word_vocabulary(plan.experiment.model)
    if vocabulary is None:
        return
    spare = sorted(t for t in vocabulary if t == "sks" or t.startswith("<"))
    hint = f"use one of its spare tokens ({', '.join(spare)})" if spare else "use a word it has"
    used = [
        (f"defences.{name}.tokens", token) for name, c in plan.defences.items() for token in c.tokens or []
    ]
    used += [
        (f"attacks.{attack.name}", attack.config.token)  # a per-target attack's name ends in its target
        for attack in plan.attacks
        if "{token}" in (attack.config.prompt or "")
        or attack.config.method in ("textual_inversion", "custom_diffusion")
    ]
    for where, token in dict.fromkeys(used):
        if token not in vocabulary:
            errors.append(f"{where}: the token '{token}' is not a word of the model's tokenizer; {hint}")


def _check_data(spec: str, world, where: str, errors: list[str]) -> None:
    """A data string must name concepts the data has and folders that exist."""
    from diffimmune.data.sources import parse_filter, world_factors

    try:
        if spec.startswith("world:"):
            if world is None:
                errors.append(
                    f"{where}: '{spec}' draws from the concept world, but the model is not a world model"
                )
                return
            column, _, values = parse_filter(spec.removeprefix("world:"))
            factors = world_factors(world)
            if column not in factors:
                errors.append(f"{where}: the world has no column '{column}'; it has {', '.join(factors)}")
                return
            for value in values:
                if value not in factors[column]:
                    errors.append(
                        f"{where}: the world has no {column} '{value}'; it has {', '.join(factors[column])}"
                    )
            return
        folder, _, concept = spec.partition("::")
        if not Path(folder).is_dir():
            problem = f"image folder {folder} does not exist; give a captioned image folder"
            if not any(e.endswith(problem) for e in errors):  # once, at the first field that names it
                errors.append(f"{where}: {problem}")
            return
        from diffimmune.data.concepts import ConceptSet

        concept_set = ConceptSet.from_folder(folder)
        if concept:
            concept_set.select(concept)
    except DiffImmuneError as error:
        errors.append(f"{where}: {error}")


def validate_experiment(data: dict, source: str = "experiment") -> ExperimentPlan:
    """Validate the whole experiment; every problem is reported at once, each naming its field."""
    from diffimmune.attacks.presets import world_attack
    from diffimmune.methods.common import ImmunizeConfig, concept_word

    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as error:
        # Report the top-level errors together with those of the sections that did parse.
        errors = _errors_of(error, "")
        errors += _section_errors(data)
        raise DiffImmuneError(f"{source}: {len(errors)} error(s): " + "; ".join(errors)) from None
    errors: list[str] = []
    world = _world_of(experiment.model)
    if experiment.model not in (WORLD_MODEL,) and not experiment.model.startswith(WORLD_MODEL + ":"):
        path = Path(experiment.model)
        looks_local = path.is_absolute() or experiment.model.startswith(".") or path.exists()
        if looks_local and not path.exists():
            errors.append(
                f"model: {experiment.model} does not exist; give a diffusers folder, a hub id or 'world'"
            )
    if experiment.data is not None and not Path(experiment.data).is_dir():
        errors.append(f"data: image folder {experiment.data} does not exist; give a captioned image folder")
    targets = []
    for index, concept in enumerate(experiment.targets):
        spec = concept_spec(concept, experiment.data, world)
        if spec is None:
            errors.append(f"targets.{index}: '{concept}' needs data: set `data:` to a captioned image folder")
            continue
        _check_data(spec, world, f"targets.{index}", errors)
        targets.append(spec)
    words = []
    for spec in targets:
        try:
            words.append(concept_word(spec))
        except DiffImmuneError as error:
            errors.append(f"targets: {error}")
    plan = ExperimentPlan(experiment, source, world, targets, words)

    models = [BASE] + ([ERASED] if experiment.erase else [])
    for name, raw in experiment.defences.items():
        where = f"defences.{name}"
        if name in (BASE, ERASED):
            errors.append(f"{where}: '{name}' is reserved for the base/erased model; choose another name")
            continue
        settings = dict(raw or {})
        start = settings.pop("on", ERASED if experiment.erase else BASE)
        if start not in models:
            errors.append(f"{where}.on: '{start}' is not a model here; use {' or '.join(models)}")
        given_concepts = "concepts" in settings  # the defaults were checked as `targets`
        settings.setdefault("concepts", targets)
        settings.setdefault("seed", experiment.seed)
        try:
            config = ImmunizeConfig.model_validate(settings)
        except ValidationError as error:
            errors += _errors_of(error, f"{where}.")
            continue
        for index, spec in enumerate(config.concepts if given_concepts else []):
            _check_data(spec, world, f"{where}.concepts.{index}", errors)
        plan.defences[name] = config
        plan.defence_models[name] = start
    models += list(experiment.defences)

    for name, raw in experiment.attacks.items():
        plan.attacks += _attack_plans(name, dict(raw or {}), plan, world_attack, errors)

    chosen = experiment.attack_models
    if chosen is None:
        chosen = ([ERASED] if experiment.erase else [BASE]) + list(experiment.defences)
    for index, name in enumerate(chosen):
        if name not in models:
            errors.append(f"attack_models.{index}: '{name}' is not a model here; known: {', '.join(models)}")
    plan.attack_models = list(chosen)
    _check_tokens(plan, errors)
    _check_evaluate(experiment.evaluate, world, errors)
    if errors:
        raise DiffImmuneError(f"{source}: {len(errors)} error(s): " + "; ".join(errors))
    return plan


def _check_evaluate(settings: EvaluateSpec, world, errors: list[str]) -> None:
    """A model outside the world needs an encoder; named checkpoints and safe data must exist."""
    from diffimmune.models.loading import looks_like_hub_id

    if world is None and not (settings.clip or settings.dino):
        errors.append(
            "evaluate.clip: this model is not a world model, so its evaluation needs an image encoder; "
            "set evaluate.clip to a CLIP checkpoint folder (and/or evaluate.dino to a DINOv2 one)"
        )
    for name in ("clip", "dino"):
        location = getattr(settings, name)
        if location and not Path(location).expanduser().exists() and not looks_like_hub_id(location):
            errors.append(f"evaluate.{name}: {location} does not exist; give a checkpoint folder")
    if settings.safe_data:
        _check_data(settings.safe_data, world, "evaluate.safe_data", errors)


def _section_errors(data: dict) -> list[str]:
    """Field errors of the defences and attacks, for when the top level itself failed to validate."""
    from diffimmune.methods.common import ImmunizeConfig

    errors = []
    for section, model_type in (("defences", ImmunizeConfig), ("attacks", AttackConfig)):
        entries = data.get(section)
        if not isinstance(entries, dict):
            continue
        for name, raw in entries.items():
            if not isinstance(raw, dict):
                continue
            settings = {k: v for k, v in raw.items() if k not in ("on", "preset", "per_target", "tokens")}
            if section == "defences":
                settings.setdefault("concepts", ["world:shape=x"])
            else:
                settings.setdefault("data", "world:shape=x")
                if "preset" in raw:
                    settings.setdefault("method", raw["preset"])
                    settings.setdefault("learning_rate", 1.0)
            try:
                model_type.model_validate(settings)
            except ValidationError as error:
                errors += _errors_of(error, f"{section}.{name}.")
    return errors


def _attack_plans(name, settings, plan: ExperimentPlan, world_attack, errors) -> list[AttackPlan]:
    where = f"attacks.{name}"
    preset = settings.pop("preset", None)
    # A preset teaches a concept with a placeholder token: one attack per target, not one token for all.
    per_target = bool(settings.pop("per_target", preset is not None))
    # One placeholder token per target (the tokens a defence's `tokens` immunized): without it every
    # per-target attack teaches its concept with AttackConfig's token (sks).
    tokens = settings.pop("tokens", None)
    experiment = plan.experiment
    settings.setdefault("seed", experiment.seed)
    benign = (settings.get("method") or preset) == "benign"
    # Evaluation targets as column=value: the filter part of each target's data string.
    target_filters = [
        spec.partition("::")[2] if "::" in spec else spec.removeprefix("world:") for spec in plan.targets
    ]
    targets_data = plan.targets
    groups: list[tuple[str, list[str], list[str]]]  # (name, data specs, evaluation targets)
    if benign:  # data without the targets; measured on the targets
        groups = [(name, [settings.get("data", "")], target_filters)]
    elif "data" in settings:  # measured on what its data teaches (evaluate.py reads the filter)
        groups = [(name, [settings["data"]], [])]
    elif per_target:
        groups = [
            (f"{name}-{w}", [spec], [f])
            for w, spec, f in zip(plan.target_words, targets_data, target_filters, strict=False)
        ]
    else:
        groups = [(name, targets_data, target_filters)]
    group_tokens: list[str | None] = [None] * len(groups)
    if tokens is not None:
        if not per_target or benign or "data" in settings:
            errors.append(
                f"{where}.tokens: one token per target needs a per-target attack (a preset, or "
                "per_target: true, without data)"
            )
            return []
        if "token" in settings:
            errors.append(f"{where}.tokens: give either token (one for every target) or tokens, not both")
            return []
        if (
            not isinstance(tokens, list)
            or len(tokens) != len(groups)
            or not all(isinstance(t, str) and t.strip() for t in tokens)
        ):
            errors.append(
                f"{where}.tokens: give one placeholder token per target ({len(groups)}), "
                'e.g. ["<v1>", "<v2>"]'
            )
            return []
        group_tokens = list(tokens)
    plans = []
    for (attack_name, specs, eval_targets), token in zip(groups, group_tokens, strict=True):
        values = dict(settings)
        if token is not None:
            values["token"] = token
        if "data" not in values:
            if benign and plan.world is not None:
                values["data"] = "world:shape!=" + ",".join(plan.target_words)
            elif all(s.startswith("world:shape=") for s in specs):
                values["data"] = "world:shape=" + ",".join(s.removeprefix("world:shape=") for s in specs)
            elif len(specs) == 1:
                values["data"] = specs[0]
            else:
                errors.append(f"{where}.data: give the attack's data (pooled targets need world data)")
                continue
        if preset is not None:
            if preset not in ATTACK_METHODS:
                errors.append(
                    f"{where}.preset: unknown preset '{preset}'; known: {', '.join(ATTACK_METHODS)}"
                )
                continue
            steps = values.pop("steps", 400)
            try:
                base = world_attack(
                    preset, concept=plan.target_words[0] if plan.target_words else "heart", steps=steps
                )
            except ValidationError as error:
                errors += _errors_of(error, f"{where}.")
                continue
            values = {**base.model_dump(exclude_unset=True), **values, "steps": steps}
        try:
            config = AttackConfig.model_validate(values)
        except ValidationError as error:
            errors += _errors_of(error, f"{where}.")
            continue
        if "data" in settings:  # data made from the targets was checked as `targets`
            _check_data(config.data, plan.world, f"{where}.data", errors)
        if not eval_targets:
            from diffimmune.eval.evaluate import target_concepts

            try:
                eval_targets = [f"{column}={value}" for column, value in target_concepts(config, None)]
            except DiffImmuneError:
                eval_targets = []
        # Known shapes among the experiment's other targets would be read as kept ones (a held-out shape
        # never is: only known shapes are); none outside the world, whose evaluation reads no other concepts.
        known = set(plan.world.known_shapes) if plan.world is not None else set()
        exclude = [f for f in target_filters if f not in eval_targets and f.partition("=")[2] in known]
        plans.append(AttackPlan(attack_name, config, eval_targets, exclude))
    return plans


# ----------------------------------------------------------------------------------------- hashing
def evaluation_key(settings: EvaluateSpec) -> dict:
    """The evaluate settings a stage hash covers. The fields for models outside the world count only when
    set, so runs cached before they existed stay cached."""
    from diffimmune.eval.evaluate import GENERAL_FIELDS

    values = settings.model_dump(mode="json")
    if values.get("other_concepts_at") == "every":  # the default, and what runs before the field read
        del values["other_concepts_at"]
    return {k: v for k, v in values.items() if k not in GENERAL_FIELDS or v not in (None, False)}


def immunize_key(config) -> dict:
    """The immunization settings a stage hash covers: fields added later count only away from the value
    earlier runs had (methods.common.IMMUNIZE_FIELDS_ADDED), so the cached immunizations stay cached."""
    from diffimmune.methods.common import IMMUNIZE_FIELDS_ADDED

    values = config.model_dump(mode="json")
    return {k: v for k, v in values.items() if IMMUNIZE_FIELDS_ADDED.get(k, object()) != v}


def evaluation_file(
    attack_folder: Path,
    settings: EvaluateSpec,
    targets: list[str],
    key: str | None = None,
    others_exclude: list[str] | None = None,
) -> Path:
    """The CSV in which the pipeline keeps an attack folder's evaluation under `settings` on `targets`
    (column=value): each attack folder keeps one per evaluation, so a reader need not depend on which
    models the run folder's last `diffimmune run` listed. `key` is the attack stage's hash, read from
    the folder's stage record when not given; `others_exclude`, the experiment's other targets
    (`AttackPlan.others_exclude`, a part of the name only when there are some)."""
    if key is None:
        record = Path(attack_folder) / STAGE_FILE
        if not record.is_file():
            raise DiffImmuneError(
                f"{record} is missing: {attack_folder} is not a finished attack of a pipeline run"
            )
        key = json.loads(record.read_text())["key"]
    parts = [key, evaluation_key(settings), targets]
    if others_exclude:
        parts.append({"others_exclude": sorted(others_exclude)})
    return Path(attack_folder) / f"eval-{stage_hash('evaluate', *parts)}.csv"


def stage_hash(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass
class Stage:
    """One unit of work: its kind, display name, folder, and what it costs."""

    kind: Literal["world", "erase", "immunize", "attack", "evaluate", "report"]
    name: str
    folder: Path
    key: str
    training_steps: int = 0
    images: int = 0
    model: str = ""

    @property
    def done(self) -> bool:
        if self.kind == "evaluate":
            return self.folder.is_file()
        record = self.folder / STAGE_FILE
        return record.is_file() and json.loads(record.read_text()).get("key") == self.key

    @contextlib.contextmanager
    def claimed(self, locks: Path):
        """Yields whether this stage is still to run, holding its lock (in the folder `locks`) while it
        runs: two runs into one folder (subsets of a file, or two files sharing stages) never work on the
        same stage at once; the second waits for the first and then finds the stage done."""
        if self.done:
            yield False
            return
        from filelock import FileLock

        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"{self.kind}-{self.key}.lock")):
            yield not self.done


def build_stages(plan: ExperimentPlan, run_dir: Path) -> list[Stage]:
    """Every stage of the experiment, in order, with its folder and hash (nothing is run)."""
    experiment = plan.experiment
    base_key = stage_hash("model", experiment.model)
    keys = {BASE: base_key}
    folders: dict[str, Path] = {}
    stages: list[Stage] = []
    if experiment.erase is not None:
        erase = experiment.erase
        key = stage_hash("erase", base_key, erase.model_dump(mode="json"), plan.targets)
        folder = run_dir / "erase" / f"{erase.method}-{key}"
        steps = erase.steps if erase.method == "esd" else 0
        stages.append(Stage("erase", ERASED, folder, key, training_steps=steps, model=BASE))
        keys[ERASED], folders[ERASED] = key, folder
    for name, config in plan.defences.items():
        start = plan.defence_models[name]
        key = stage_hash("immunize", keys[start], immunize_key(config))
        folder = run_dir / "immunize" / f"{name}-{key}"
        stages.append(Stage("immunize", name, folder, key, training_steps=config.steps, model=start))
        keys[name], folders[name] = key, folder
    settings = experiment.evaluate
    sampled_at_start: set = set()  # (model, what is generated) already counted at step 0 (shared samples)
    for model in plan.attack_models:
        for attack in plan.attacks:
            config = attack.config
            key = stage_hash("attack", keys[model], config.model_dump(mode="json"))
            folder = run_dir / "attacks" / f"{model}-{key}" / attack.name
            images = config.num_images + (config.num_class_images if config.prior_preservation else 0)
            stages.append(
                Stage("attack", f"{model} / {attack.name}", folder, key, config.steps, images, model=model)
            )
            evaluation = evaluation_file(folder, settings, attack.targets, key, attack.others_exclude)
            generated = _evaluation_sets(plan, attack, settings)
            # Read at every saved step: the targets, and the other concepts unless only at the start.
            every = {
                w: n
                for w, n in generated.items()
                if w[0] in attack.targets or settings.other_concepts_at == "every"
            }
            later = sum(every.values()) * (len(config.checkpoints()) - 1)
            # Every attack's step 0 is the model itself: a set generated there once is shared.
            first = sum(n for what, n in generated.items() if (model, what) not in sampled_at_start)
            sampled_at_start.update((model, what) for what in generated)
            stages.append(
                Stage(
                    "evaluate",
                    f"{model} / {attack.name}",
                    evaluation,
                    evaluation.stem.removeprefix("eval-"),
                    images=first + later,
                    model=model,
                )
            )
    stages.append(
        Stage("report", "report", run_dir / "report.html", stage_hash("report", [s.key for s in stages]))
    )
    return stages


def _evaluation_sets(plan: ExperimentPlan, attack, settings) -> dict[tuple, int]:
    """What one saved step of an attack generates for its evaluation: (concept, prompt template, token)
    -> images. Targets are prompted through the attack's template; the world's other shapes by their
    captions, the safe data (models outside the world) by its own captions."""
    config = attack.config
    sets = {(t, config.prompt, config.token): settings.samples for t in attack.targets}
    if plan.world is None:
        if settings.safe_data:
            sets[(settings.safe_data, None, None)] = settings.references
        return sets
    from diffimmune.eval.evaluate import other_shapes

    others = other_shapes(plan.world, [*attack.targets, *attack.others_exclude], settings.other_concepts)
    sets.update({(f"shape={s}", None, None): settings.samples for s in others})
    return sets


def describe_plan(plan: ExperimentPlan, stages: list[Stage]) -> list[str]:
    """One line per stage: kind, name, cached or to run, training steps and images."""
    lines = [
        f"experiment {plan.experiment.name}: model {plan.experiment.model}, targets {', '.join(plan.target_words)}"
    ]
    total_steps = total_images = 0
    for stage in stages:
        if stage.kind == "report":
            continue
        state = "cached" if stage.done else "to run"
        cost = []
        if stage.training_steps:
            cost.append(f"{stage.training_steps} training steps")
        if stage.images:
            verb = "images generated" if stage.kind == "evaluate" else "training images"
            cost.append(f"{stage.images} {verb}")
        if not stage.done:
            total_steps += stage.training_steps
            total_images += stage.images if stage.kind == "evaluate" else 0
        lines.append(f"  {stage.kind:<9} {stage.name:<32} {state:<7} {', '.join(cost) or 'closed form'}")
    lines.append(f"to run: {total_steps} training steps, {total_images} evaluation images")
    return lines


# ----------------------------------------------------------------------------------------- running
@dataclass
class ExperimentResult:
    run_dir: Path
    executed: list[str]  # "kind:name" of the stages that ran (not cached)
    metrics_csv: Path | None
    report: Path | None
    model_sources: dict[str, str]
    seconds: float

    def summary(self) -> dict:
        from diffimmune.eval.evaluate import read_metrics_csv

        return summarise(read_metrics_csv(self.metrics_csv), self.model_sources) if self.metrics_csv else {}


def resolve_model(model: str, log: Callable[[str], None]) -> str:
    """'world' / 'world:PRESET' -> the built (or cached, or shipped) world model folder."""
    if model == WORLD_MODEL or model.startswith(WORLD_MODEL + ":"):
        from diffimmune.recipes.world_build import build_world

        return str(build_world(model.partition(":")[2] or "default", progress=True, log=log).model_dir)
    return model


# Held while a run's combined files (experiment.json, metrics.csv, the report) are rewritten from its stages.
COMBINE_LOCK = ".combine.lock"
# Where a run holds the lock of each stage it is working on (`Stage.claimed`).
LOCKS = ".locks"


def combine_run(
    experiment: ExperimentPlan | str | Path, run_dir: str | Path, timeout: float = -1
) -> ExperimentResult:
    """Rewrite a run's combined files from every stage of the experiment already done, running nothing
    (after `diffimmune run --defences/--attacks`). `experiment`: the whole file's plan (as `load_run` read
    it when the run started), or the file's path, read now. Two subset runs finishing together each do
    this; the lock makes the second read the stages after the first has written, so neither's rows are
    lost (`timeout`: seconds to wait for it, -1 for as long as it takes)."""
    from filelock import FileLock

    plan = experiment if isinstance(experiment, ExperimentPlan) else load_experiment(experiment)
    run_dir = ensure_writable_folder(run_dir, "run folder")
    with FileLock(str(run_dir / COMBINE_LOCK), timeout=timeout):
        return run_experiment(plan, run_dir, progress=False, log=lambda m: None, cached_only=True)


def run_experiment(
    plan: ExperimentPlan,
    run_dir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    cached_only: bool = False,
) -> ExperimentResult:
    """Run every stage that is not cached; returns where things are and which stages ran. With
    `cached_only`, run nothing: the combined metrics and report cover the stages already done (what
    `diffimmune run --defences/--attacks` writes after its subset, so the run's files keep every row)."""
    from diffimmune.attacks.runner import run_attack
    from diffimmune.data.sources import model_world
    from diffimmune.eval.evaluate import (
        SHARED_SAMPLES,
        EvalSettings,
        evaluate_attack,
        read_metrics_csv,
        write_metrics_csv,
    )
    from diffimmune.methods.common import immunize
    from diffimmune.models.diffusion_model import load_model
    from diffimmune.report.report import write_report

    began = time.perf_counter()
    run_dir = ensure_writable_folder(run_dir, "run folder")
    experiment = plan.experiment
    write_json_atomic(run_dir / "experiment.json", experiment.model_dump(mode="json"))
    stages = build_stages(plan, run_dir)
    load_options = {
        "allow_pickle": experiment.allow_pickle,
        "trust_remote_code": experiment.trust_remote_code,
    }
    sources = {BASE: resolve_model(experiment.model, log)}
    executed: list[str] = []

    def finish(stage: Stage, started: float, extra: dict | None = None) -> None:
        executed.append(f"{stage.kind}:{stage.name}")
        record = {
            "key": stage.key,
            "kind": stage.kind,
            "name": stage.name,
            "seconds": time.perf_counter() - started,
        }
        write_json_atomic(stage.folder / STAGE_FILE, record | (extra or {}))

    eval_settings = EvalSettings(**experiment.evaluate.model_dump())
    rows: list[dict] = []
    attack_dirs: list[Path] = []
    plans_by_name = {f"{m} / {a.name}": a for m in plan.attack_models for a in plan.attacks}
    # cached_only: the attack folders whose evaluation is done (no other run reads this)
    evaluated = {s.folder.parent for s in stages if s.kind == "evaluate" and s.done} if cached_only else set()
    locks = run_dir / LOCKS
    for stage in stages:
        started = time.perf_counter()
        if cached_only and stage.kind != "report" and not (stage.done and stage.model in sources):
            continue  # not done yet (or its model is not): left out of the combined files
        if cached_only and stage.kind == "attack" and stage.folder not in evaluated:
            continue  # trained, not yet evaluated: its row would be empty
        if stage.kind == "erase":
            with stage.claimed(locks) as todo:
                if todo:
                    log(f"erase: {experiment.erase.method} on {', '.join(plan.target_words)}")
                    _erase(plan, load_model(sources[BASE], **load_options), stage.folder, progress)
                    finish(stage, started)
            sources[ERASED] = str(stage.folder.resolve())
        elif stage.kind == "immunize":
            with stage.claimed(locks) as todo:
                if todo:
                    log(
                        f"immunize: {stage.name} ({plan.defences[stage.name].method}, {stage.training_steps} steps)"
                    )
                    model = load_model(sources[stage.model], **load_options)
                    config = plan.defences[stage.name]
                    if config.anchor_reference == BASE:  # the experiment's model, before the erasure
                        config = config.model_copy(update={"anchor_reference": sources[BASE]})
                    immunize(
                        model,
                        config,
                        stage.folder,
                        resume=True,
                        progress=progress,
                        world=model_world(model),
                        log=log,
                    )
                    finish(stage, started)
            sources[stage.name] = str((stage.folder / "delta").resolve())
        elif stage.kind == "attack":
            attack = plans_by_name[stage.name]
            with stage.claimed(locks) as todo:
                if todo:
                    log(f"attack: {stage.name} ({attack.config.method}, {attack.config.steps} steps)")
                    model = load_model(sources[stage.model], **load_options)
                    run_attack(
                        model,
                        attack.config,
                        stage.folder,
                        resume=True,
                        progress=progress,
                        world=model_world(model),
                    )
                    finish(stage, started)
            attack_dirs.append(stage.folder)
        elif stage.kind == "evaluate":
            attack = plans_by_name[stage.name]
            with stage.claimed(locks) as todo:
                if todo:
                    log(f"evaluate: {stage.name}")
                    found = evaluate_attack(
                        stage.folder.parent,
                        eval_settings,
                        attack.targets,
                        log=log,
                        shared_samples=run_dir / SHARED_SAMPLES,
                        others_exclude=attack.others_exclude,
                    )
                    for row in found:
                        row["attack"] = attack.name
                    write_metrics_csv(found, stage.folder)
                    executed.append(f"evaluate:{stage.name}")
            # The model column names the model as this run knows it (a moved or copied run folder
            # keeps its cached evaluations).
            rows += [{**row, "model": sources[stage.model]} for row in read_metrics_csv(stage.folder)]
        elif stage.kind == "report":
            metrics_csv = write_metrics_csv(rows, run_dir / "metrics.csv")
            names = {source: name for name, source in sources.items()}
            # The model without immunization is the gaps' reference only if it was attacked
            # (attack_models may list immunized models alone); without it the report says why it skips them.
            reference = sources.get(ERASED, sources[BASE])
            markdown, html = write_report(
                run_dir,
                title=experiment.report.title or experiment.name,
                reference_model=reference if any(row["model"] == reference for row in rows) else None,
                attack_dirs=attack_dirs,
                model_names=names,
            )
            executed.append("report:report")
    return ExperimentResult(run_dir, executed, metrics_csv, html, sources, time.perf_counter() - began)


def _erase(plan: ExperimentPlan, model, out_dir: Path, progress: bool) -> None:
    from diffimmune.data.sources import model_world
    from diffimmune.methods.common import ImmunizeConfig, immunize
    from diffimmune.methods.uce import UCEConfig, erase_with_uce

    erase = plan.experiment.erase
    words = erase.concepts or plan.target_words
    if erase.method == "uce":
        preserve = erase.preserve
        if preserve is None:
            preserve = [s for s in plan.world.known_shapes if s not in words] if plan.world else []
        config = UCEConfig(
            concepts=words,
            guide=erase.guide,
            preserve=preserve,
            lamb=erase.lamb,
            erase_scale=erase.erase_scale,
            preserve_scale=erase.preserve_scale,
        )
        erase_with_uce(model, config, out_dir)
        return
    specs = [concept_spec(w, plan.experiment.data, plan.world) for w in words]
    config = ImmunizeConfig(
        method="esd",
        concepts=specs,
        esd_variant=erase.esd_variant,
        steps=erase.steps,
        learning_rate=erase.learning_rate,
        seed=plan.experiment.seed,
    )
    immunize(model, config, out_dir, resume=True, progress=progress, world=model_world(model))


# ----------------------------------------------------------------------------------------- the demo
# `diffimmune demo`: the main job on the embedded default (configs/demo.yaml is the same experiment).
DEMO_EXPERIMENT: dict = {
    "name": "demo",
    "model": WORLD_MODEL,
    "targets": ["star", "square"],
    "erase": {"method": "uce"},
    "defences": {"mima": {"method": "mima", "steps": 150, "retain_weight": 1.0, "max_loss": 0.3}},
    "attacks": {
        "lora": {
            "method": "lora",
            "learning_rate": 3.0e-3,
            "rank": 4,
            "steps": 400,
            "num_images": 20,
            "save_at": [0, 100, 200, 400],
        }
    },
    "evaluate": {"samples": 8},
    "report": {"title": "diffimmune demo: UCE-erased vs MIMA-immunized, under a LoRA re-learning attack"},
}


def summary_lines(summary: dict, immunized: str = "mima", baseline: str = ERASED) -> list[str]:
    """The demo's three lines: target detection after the attack with and without immunization, and
    safe-concept retention."""

    def pct(name: str, key: str) -> str:
        value = summary.get(name, {}).get(key)
        return "n/a" if value is None else f"{value:.0%}"

    return [
        f"target detection after the attack: {baseline} {pct(baseline, 'target_after_attack')}, "
        f"{immunized} {pct(immunized, 'target_after_attack')} (lower is better)",
        f"target detection before the attack: {baseline} {pct(baseline, 'target_before_attack')}, "
        f"{immunized} {pct(immunized, 'target_before_attack')}",
        f"safe-concept retention (other shapes detected, no attack): {baseline} "
        f"{pct(baseline, 'other_concepts')}, {immunized} {pct(immunized, 'other_concepts')}",
    ]


# ----------------------------------------------------------------------------------------- summary
def summarise(rows: list[dict], sources: dict[str, str]) -> dict:
    """Per model: target detection at the first and last attack step (mean over attacks and targets),
    and the other concepts' detection before any attack (step 0)."""
    from diffimmune.report.report import RunMetrics

    by_source = {source: name for name, source in sources.items()}
    metrics = RunMetrics(rows)
    values: dict[str, dict[str, list[float]]] = {}
    for key in metrics.keys:
        slots = values.setdefault(by_source.get(key[0], key[0]), {"first": [], "last": [], "other": []})
        last = metrics.steps(key)[-1]
        for concept in metrics.target_concepts(key):
            series = metrics.series(key, concept, "detection")
            slots["last"].append(series[last])
            if 0 in series and last != 0:
                slots["first"].append(series[0])
        for concept in metrics.other_concepts(key):
            series = metrics.series(key, concept, "detection")
            if 0 in series:
                slots["other"].append(series[0])

    def mean(items: list[float]) -> float | None:
        return sum(items) / len(items) if items else None

    return {
        name: {
            "target_before_attack": mean(slots["first"]),
            "target_after_attack": mean(slots["last"]),
            "other_concepts": mean(slots["other"]),
        }
        for name, slots in sorted(values.items())
    }
