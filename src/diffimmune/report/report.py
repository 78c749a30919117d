"""The run report: `report.md` and a self-contained `report.html` for a run folder.

This module owns what a reader of a run sees: the summary table (target-concept detection, retention of
the other concepts, FID), metric curves over attack steps, the gap ratios between models with and
without immunization (SGR, MSGR; MRSGR where its data exists), image grids of the evaluation's cached
samples at each saved step, and each attack's configuration. Its inputs are `RUN/metrics.csv` (written
by `eval/evaluate.py`) and the attack folders under RUN (`attacks/runner.py`).

Both files are rendered from one list of blocks, so they never disagree. Figures are PNGs under
`RUN/report_assets/` (linked from the markdown) and embedded as base64 data URIs in the HTML, which
needs nothing outside itself. Everything is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffimmune.errors import DiffImmuneError
from diffimmune.eval.metrics import msgr, sgr
from diffimmune.files import atomic_file, atomic_folder
from diffimmune.report.grids import make_grid

__all__ = [
    "AttackFolder",
    "GapComparison",
    "SummaryRow",
    "find_attack_folders",
    "gap_ratios",
    "short_model_names",
    "summary_rows",
    "write_report",
]

METRICS_FILE = "metrics.csv"
ASSETS_FOLDER = "report_assets"
GRID_COLUMNS = 8
SAFE_CONCEPT = "safe"  # the concept of the FID/KID rows
# The similarity (the M of the gap ratios) and FID a run has: the world encoder's, else CLIP's, else DINO's.
SIMILARITY_METRICS = ("similarity_world", "similarity_clip", "similarity_dino")
FID_METRICS = ("fid_world", "fid_clip", "fid_dino")
RATE_METRICS = ("detection", "best_of_25")
IMMUNIZED_MARK = "immun"
PROJECT_NAME = "diffimmune"
MISSING = "—"

Key = tuple[str, str]  # (model, attack) as in the CSV's columns


# ---------------------------------------------------------------------------------------- inputs
class RunMetrics:
    """metrics.csv indexed by (model, attack) -> concept -> metric -> {step: value}."""

    def __init__(self, rows: list[dict]):
        self.values: dict[Key, dict[str, dict[str, dict[int, float]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(dict))
        )
        self.repeated: set[Key] = set()
        for row in rows:
            key = (row["model"], row["attack"])
            series = self.values[key][row["concept"]][row["metric"]]
            if row["step"] in series:
                self.repeated.add(key)
            series[row["step"]] = row["value"]
        # Same attack name next to each other, so with and without immunization sit side by side.
        self.keys: list[Key] = sorted(self.values, key=lambda k: (k[1], k[0]))
        self.models: list[str] = sorted({model for model, _ in self.keys})
        present = {row["metric"] for row in rows}
        self.similarity = next((m for m in SIMILARITY_METRICS if m in present), SIMILARITY_METRICS[0])
        self.fid = next((m for m in FID_METRICS if m in present), FID_METRICS[0])
        self.curve_metrics = ("detection", self.similarity, "clip_score", "best_of_25")

    def series(self, key: Key, concept: str, metric: str) -> dict[int, float]:
        return dict(self.values.get(key, {}).get(concept, {}).get(metric, {}))

    def steps(self, key: Key) -> list[int]:
        return sorted(
            {s for metrics in self.values[key].values() for series in metrics.values() for s in series}
        )

    def target_concepts(self, key: Key) -> list[str]:
        """evaluate.py writes best_of_25 for target concepts only; without a detector (eval/general.py
        with no safe data) every concept but the safe one is a target."""
        concepts = self.values[key]
        marked = sorted(c for c, metrics in concepts.items() if "best_of_25" in metrics)
        return marked or sorted(c for c in concepts if c != SAFE_CONCEPT)

    def other_concepts(self, key: Key) -> list[str]:
        targets = set(self.target_concepts(key))
        return sorted(
            c
            for c, metrics in self.values[key].items()
            if c not in targets and c != SAFE_CONCEPT and "detection" in metrics
        )

    def mean_over(self, key: Key, concepts: list[str], metric: str) -> dict[int, float]:
        """{step: mean over `concepts` of `metric`} for steps where at least one concept has a value."""
        by_step: dict[int, list[float]] = defaultdict(list)
        for concept in concepts:
            for step, value in self.series(key, concept, metric).items():
                by_step[step].append(value)
        return {step: float(np.mean(values)) for step, values in sorted(by_step.items())}


def read_run_metrics(run_dir: Path) -> RunMetrics:
    from diffimmune.eval.evaluate import read_metrics_csv

    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise DiffImmuneError(f"{path} not found; run `diffimmune evaluate --run {run_dir}` first")
    try:
        rows = read_metrics_csv(path)
    except (KeyError, ValueError, TypeError) as error:
        raise DiffImmuneError(
            f"{path} is not a diffimmune metrics file ({type(error).__name__}: {error}); "
            f"write it again with `diffimmune evaluate --run {run_dir}`"
        ) from None
    if not rows:
        raise DiffImmuneError(f"{path} holds no rows; run `diffimmune evaluate --run {run_dir}` again")
    return RunMetrics(rows)


@dataclass
class AttackFolder:
    """One attack folder under the run: attack.json (read as plain JSON) and its saved steps."""

    path: Path
    relative: str
    model: str | None
    config: dict | None
    steps: dict[int, Path] = field(default_factory=dict)
    problem: str | None = None

    @property
    def name(self) -> str:
        """The name evaluate.py writes in the CSV's attack column."""
        return self.path.name

    @property
    def method(self) -> str | None:
        return (self.config or {}).get("method")


def find_attack_folders(run_dir: Path, paths: list[Path] | None = None) -> list[AttackFolder]:
    """The given attack folders, else every folder holding attack.json: the run folder itself, else
    those below it."""
    if paths is None:
        paths = (
            [run_dir]
            if (run_dir / "attack.json").is_file()
            else sorted(p.parent for p in run_dir.rglob("attack.json"))
        )
    folders = []
    for path in paths:
        relative = path.relative_to(run_dir).as_posix() if path != run_dir else path.name
        model, config, problem = None, None, None
        try:
            record = json.loads((path / "attack.json").read_text())
            model, config = record.get("model"), record.get("config")
        except (OSError, ValueError, AttributeError) as error:
            problem = f"attack.json could not be read ({error})"
        folders.append(AttackFolder(path, relative, model, config, _saved_steps(path), problem))
    return folders


def _saved_steps(attack_dir: Path) -> dict[int, Path]:
    root = attack_dir / "steps"
    steps = {}
    if root.is_dir():
        for folder in root.iterdir():
            match = re.fullmatch(r"step-(\d+)", folder.name)
            if match and folder.is_dir():
                steps[int(match.group(1))] = folder
    return dict(sorted(steps.items()))


# ---------------------------------------------------------------------------------------- names
def short_model_names(models: list[str]) -> dict[str, str]:
    """The last two path components of each model, more where two would collide."""
    names = {}
    for model in models:
        parts = PurePath(model).parts or (model,)
        depth = min(2, len(parts))
        while True:
            name = "/".join(parts[-depth:])
            clashes = [
                m for m in models if m != model and "/".join((PurePath(m).parts or (m,))[-depth:]) == name
            ]
            if not clashes or depth >= len(parts):
                break
            depth += 1
        names[model] = name
    return names


# ---------------------------------------------------------------------------------------- summary
@dataclass
class SummaryRow:
    """One model x attack: target detection (mean over target concepts), retention and FID."""

    model: str
    attack: str
    targets: list[str]
    first_step: int
    last_step: int
    detection_first: float | None
    detection_last: float | None
    detection_max: float | None
    retention_first: float | None
    retention_last: float | None
    fid_first: float | None
    fid_last: float | None


def summary_rows(metrics: RunMetrics) -> list[SummaryRow]:
    rows = []
    for key in metrics.keys:
        steps = metrics.steps(key)
        first, last = steps[0], steps[-1]
        detection = metrics.mean_over(key, metrics.target_concepts(key), "detection")
        retention = metrics.mean_over(key, metrics.other_concepts(key), "detection")
        fid = metrics.series(key, SAFE_CONCEPT, metrics.fid)
        rows.append(
            SummaryRow(
                model=key[0],
                attack=key[1],
                targets=metrics.target_concepts(key),
                first_step=first,
                last_step=last,
                detection_first=detection.get(first),
                detection_last=detection.get(last),
                detection_max=max(detection.values()) if detection else None,
                retention_first=retention.get(first),
                retention_last=retention.get(last),
                fid_first=fid.get(first),
                fid_last=fid.get(last),
            )
        )
    return rows


# ---------------------------------------------------------------------------------------- gap ratios
@dataclass
class GapComparison:
    """The same attack on a model with immunization and on one without (the reference)."""

    label: str
    model_with: str
    attack_with: str
    model_without: str
    attack_without: str
    steps: list[int]
    # concept -> step -> (M(ref, without), M(ref, with), SGR or None where undefined)
    sgr: dict[str, dict[int, tuple[float, float, float | None]]]
    last_step: int | None
    msgr: float | None
    note: str | None = None


def _comparison_groups(metrics: RunMetrics, methods: dict[Key, str]) -> dict[str, list[Key]]:
    """Attacks to compare across models: by attack name, else by the attack method of attack.json."""
    by_name: dict[str, list[Key]] = defaultdict(list)
    for key in metrics.keys:
        by_name[key[1]].append(key)
    groups = {f"attack {name}": keys for name, keys in by_name.items() if len({m for m, _ in keys}) >= 2}
    grouped = {key for keys in groups.values() for key in keys}
    by_method: dict[str, list[Key]] = defaultdict(list)
    for key in metrics.keys:
        if key not in grouped and key in methods:
            by_method[methods[key]].append(key)
    for method, keys in by_method.items():
        models = [m for m, _ in keys]
        # One attack folder per model, or the pairing would be a guess.
        if len(set(models)) >= 2 and len(set(models)) == len(models):
            groups[f"method {method} (attacks {', '.join(sorted({a for _, a in keys}))})"] = keys
    return groups


def _reference(models: list[str], reference_model: str | None) -> tuple[str | None, str | None]:
    """(the model without immunization, or None with the reason)."""
    if reference_model is not None:
        matches = [m for m in models if reference_model in m]
        if len(matches) == 1:
            return matches[0], None
        return None, (
            f"--reference-model '{reference_model}' matches {len(matches)} of the models "
            f"({', '.join(models)}); it must match exactly one"
        )
    plain = [m for m in models if not looks_immunized(m)]
    if len(plain) == 1:
        return plain[0], None
    found = "every model path has" if not plain else f"{len(plain)} model paths lack"
    return None, (
        f"{found} '{IMMUNIZED_MARK}' in it ({', '.join(models)}), so none is known to be the one without "
        "immunization; name it with --reference-model"
    )


def looks_immunized(model: str) -> bool:
    """'immun' in the path, not counting the project's own name: world models live under
    ~/.cache/diffimmune/, which would otherwise mark every one of them."""
    return IMMUNIZED_MARK in model.lower().replace(PROJECT_NAME, "")


def gap_ratios(
    metrics: RunMetrics, methods: dict[Key, str] | None = None, reference_model: str | None = None
) -> tuple[list[GapComparison], list[str]]:
    """SGR per step and target concept and MSGR at the last common step, from the run's similarity
    (`similarity_world`, else `similarity_clip`, else `similarity_dino`),
    for every attack run on two or more models; plus notes on the groups that were skipped."""
    comparisons, notes = [], []
    for label, keys in _comparison_groups(metrics, methods or {}).items():
        reference, reason = _reference(sorted({m for m, _ in keys}), reference_model)
        if reference is None:
            notes.append(f"{label}: skipped: {reason}.")
            continue
        without = next(k for k in keys if k[0] == reference)
        for key in keys:
            if key[0] == reference:
                continue
            comparisons.append(_compare(metrics, label, key, without))
    return comparisons, notes


def _compare(metrics: RunMetrics, label: str, with_key: Key, without_key: Key) -> GapComparison:
    concepts = sorted(set(metrics.target_concepts(with_key)) & set(metrics.target_concepts(without_key)))
    table: dict[str, dict[int, tuple[float, float, float | None]]] = {}
    for concept in concepts:
        m_with = metrics.series(with_key, concept, metrics.similarity)
        m_without = metrics.series(without_key, concept, metrics.similarity)
        table[concept] = {}
        for step in sorted(set(m_with) & set(m_without)):
            try:
                ratio = sgr(m_without[step], m_with[step])
            except DiffImmuneError:
                ratio = None  # M(ref, without) <= 0: the ratio is undefined
            table[concept][step] = (m_without[step], m_with[step], ratio)
    steps = sorted({s for per_step in table.values() for s in per_step})
    comparison = GapComparison(
        label, with_key[0], with_key[1], without_key[0], without_key[1], steps, table, None, None
    )
    if not concepts:
        comparison.note = f"the two attacks share no target concept with {metrics.similarity} values"
        return comparison
    common = set.intersection(*(set(per_step) for per_step in table.values()))
    if not common:
        comparison.note = f"no step has {metrics.similarity} for every target concept on both models"
        return comparison
    comparison.last_step = max(common)
    pairs = {c: (table[c][comparison.last_step][0], table[c][comparison.last_step][1]) for c in concepts}
    try:
        comparison.msgr = msgr(pairs)
    except DiffImmuneError as error:
        comparison.note = f"MSGR undefined: {error}"
    return comparison


MRSGR_NOTE = (
    "MRSGR: not available: it compares the generations of the model with immunization to those of the "
    "model without (after the same personalisation attack), once on target concepts and once on other "
    "concepts (`eval/metrics.py`, `mrsgr`); metrics.csv holds each model's similarity to reference "
    "images only (`similarity_world`), not a similarity between the two models' generations."
)


# ---------------------------------------------------------------------------------------- figures
def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _line_styles(metrics: RunMetrics) -> dict[Key, dict]:
    """Colour by model, line style and marker by attack: the same attack on two models reads as a pair."""
    colours = [f"C{i}" for i in range(10)]
    dashes = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    attacks = sorted({a for _, a in metrics.keys})
    styles = {}
    for model, attack in metrics.keys:
        m, a = metrics.models.index(model), attacks.index(attack)
        styles[(model, attack)] = {
            "color": colours[m % len(colours)],
            "linestyle": dashes[a % len(dashes)],
            "marker": markers[a % len(markers)],
        }
    return styles


def _panel_figure(
    title: str,
    panels: list[tuple[str, dict[Key, dict[int, float]], bool]],
    labels: dict[Key, str],
    styles: dict[Key, dict],
) -> bytes:
    """One panel per (panel title, {key: {step: value}}, is a rate in [0, 1]); a shared legend below."""
    from matplotlib.figure import Figure

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    shown = [key for key in labels if any(key in series for _, series, _ in panels)]
    legend_rows = math.ceil(len(shown) / 2)
    figure = Figure(figsize=(4.6 * columns, 3.3 * rows + 0.35 * legend_rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (panel_title, series_by_key, is_rate) in zip(axes, panels, strict=False):
        for key in shown:
            series = series_by_key.get(key)
            if series:
                steps = sorted(series)
                axis.plot(steps, [series[s] for s in steps], label=labels[key], **styles[key])
        axis.set_title(panel_title, fontsize=10)
        axis.set_xlabel("attack step")
        axis.grid(alpha=0.3)
        if is_rate:
            axis.set_ylim(-0.03, 1.03)
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    handles, names = [], []
    for axis in axes[: len(panels)]:
        for handle, name in zip(*axis.get_legend_handles_labels(), strict=True):
            if name not in names:
                handles.append(handle)
                names.append(name)
    if handles:
        figure.legend(handles, names, loc="outside lower center", ncol=min(2, len(handles)), fontsize=9)
    return _png_bytes(figure)


def _curve_figures(metrics: RunMetrics, labels: dict[Key, str]) -> list[tuple[str, bytes, str]]:
    styles = _line_styles(metrics)
    concepts = sorted({c for key in metrics.keys for c in metrics.target_concepts(key)})
    figures = []
    for metric in metrics.curve_metrics:
        panels = []
        for concept in concepts:
            series = {
                key: metrics.series(key, concept, metric)
                for key in metrics.keys
                if concept in metrics.target_concepts(key) and metrics.series(key, concept, metric)
            }
            if series:
                panels.append((concept, series, metric in RATE_METRICS))
        if panels:
            caption = f"{metric} of the target concepts over the attack steps, one line per model x attack"
            figures.append(
                (
                    f"curve-{metric}",
                    _panel_figure(f"{metric} (target concepts)", panels, labels, styles),
                    caption,
                )
            )
    retention = {
        key: metrics.mean_over(key, metrics.other_concepts(key), "detection")
        for key in metrics.keys
        if metrics.other_concepts(key)
    }
    fid = {
        key: metrics.series(key, SAFE_CONCEPT, metrics.fid)
        for key in metrics.keys
        if metrics.series(key, SAFE_CONCEPT, metrics.fid)
    }
    panels = [("retention: mean detection of other concepts", retention, True)] if retention else []
    panels += [(f"{metrics.fid} on other concepts (lower is better)", fid, False)] if fid else []
    if panels:
        caption = "what the model still does: detection of the other concepts, and FID of their generations"
        figures.append(
            ("curve-retention", _panel_figure("retention and quality", panels, labels, styles), caption)
        )
    return figures


def _tile(path: Path, size: tuple[int, int] | None) -> Image.Image:
    image = Image.open(path).convert("RGB")
    if size is None:
        longest = max(image.size)
        # Small samples (the concept world's 32 px) are enlarged to be seen; large ones shrunk to keep
        # the self-contained HTML small.
        factor = max(1, 64 // longest) if longest <= 64 else 128 / longest
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    resample = Image.NEAREST if size[0] >= image.width else Image.LANCZOS
    return image.resize(size, resample)


def sample_grid(attack: AttackFolder, columns: int = GRID_COLUMNS) -> tuple[Image.Image, list[int]] | None:
    """Rows = saved steps with cached samples, up to `columns` PNGs each sorted by file name (evaluate.py
    names them by a hash of prompt and seed, so a column holds the same prompt and seed in every row)."""
    rows: list[tuple[int, list[Path]]] = []
    for step, folder in attack.steps.items():
        pngs = sorted((folder / "samples").glob("*.png"))[:columns]
        if pngs:
            rows.append((step, pngs))
    if not rows:
        return None
    size = None
    tiles: list[torch.Tensor | None] = []
    width = max(len(pngs) for _, pngs in rows)
    for _, pngs in rows:
        for index in range(width):
            if index < len(pngs):
                image = _tile(pngs[index], size)
                size = image.size
                tiles.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
            else:
                tiles.append(None)
    blank = torch.ones(3, size[1], size[0])
    stacked = torch.stack([blank if t is None else t for t in tiles])
    padding = 2
    grid = make_grid(stacked, columns=width, padding=padding)
    label_width = 78
    canvas = Image.new("RGB", (grid.width + label_width, grid.height), "white")
    canvas.paste(grid, (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=14)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    for row, (step, _) in enumerate(rows):
        middle = padding + row * (size[1] + padding) + size[1] // 2
        draw.text((6, middle), f"step {step}", fill="black", font=font, anchor="lm")
    return canvas, [step for step, _ in rows]


# ---------------------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str  # plain text; `backticks` become code


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Picture:
    name: str  # file name under report_assets/
    png: bytes
    caption: str


@dataclass(frozen=True)
class Code:
    language: str
    text: str


def _number(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _markdown(title: str, blocks: list) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_cell(h) for h in block.headers) + " |")
            lines.append("|" + "|".join("---" for _ in block.headers) + "|")
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif isinstance(block, Picture):
            lines += [f"![{block.caption}]({ASSETS_FOLDER}/{block.name})", "", f"*{block.caption}*", ""]
        elif isinstance(block, Code):
            lines += [f"```{block.language}", block.text.rstrip("\n"), "```", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _inline(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{part}</code>" if index % 2 else part for index, part in enumerate(parts))


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td { font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 0.88em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
figure { margin: 0.5em 0 1.5em; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _html(title: str, blocks: list) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in block.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in block.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Picture):
            data = base64.b64encode(block.png).decode("ascii")
            caption = html.escape(block.caption)
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
        elif isinstance(block, Code):
            body.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------- sections
def _summary_section(metrics: RunMetrics, names: dict[str, str]) -> list:
    blocks: list = [
        Heading(2, "Summary"),
        Paragraph(
            "Detection: the fraction of generations in which the detector finds the concept (target "
            "columns: mean over the target concepts; max: the highest over saved steps). Retention: mean "
            f"detection over the other concepts. FID: `{metrics.fid}` of the other concepts' generations."
        ),
    ]
    table = []
    for row in summary_rows(metrics):
        table.append(
            [
                names[row.model],
                row.attack,
                ", ".join(row.targets) or MISSING,
                f"{row.first_step} → {row.last_step}",
                _number(row.detection_first),
                _number(row.detection_last),
                _number(row.detection_max),
                _number(row.retention_first),
                _number(row.retention_last),
                _number(row.fid_first, 2),
                _number(row.fid_last, 2),
            ]
        )
    blocks.append(
        Table(
            [
                "model",
                "attack",
                "targets",
                "steps",
                "detection first",
                "detection last",
                "detection max",
                "retention first",
                "retention last",
                "FID first",
                "FID last",
            ],
            table,
        )
    )
    per_concept = []
    for key in metrics.keys:
        for concept in metrics.target_concepts(key):
            series = metrics.series(key, concept, "detection")
            if series:
                steps = sorted(series)
                per_concept.append(
                    [
                        names[key[0]],
                        key[1],
                        concept,
                        _number(series[steps[0]]),
                        _number(series[steps[-1]]),
                        _number(max(series.values())),
                    ]
                )
    if any(len(metrics.target_concepts(key)) > 1 for key in metrics.keys):
        blocks += [
            Paragraph("Per target concept:"),
            Table(
                ["model", "attack", "concept", "detection first", "detection last", "detection max"],
                per_concept,
            ),
        ]
    return blocks


def _gap_section(
    metrics: RunMetrics, methods: dict[Key, str], names: dict[str, str], reference_model: str | None
) -> list:
    blocks: list = [Heading(2, "Gap ratios (with vs without immunization)")]
    comparisons, notes = gap_ratios(metrics, methods, reference_model)
    if not comparisons and not notes:
        blocks.append(
            Paragraph(
                "Not available: no attack (by folder name or by attack method) was run on two or more "
                "models in this run folder."
            )
        )
        return blocks
    blocks.append(
        Paragraph(
            f"SGR = (M(ref, without) − M(ref, with)) / M(ref, without), with M the `{metrics.similarity}` of "
            "the attacked model's generations of a target concept to its reference images. 0: the "
            "immunization changed nothing; 1: nothing of the concept is left. MSGR: the mean SGR over "
            "target concepts at the last step both models reached."
        )
    )
    if comparisons:
        blocks.append(
            Table(
                ["comparison", "with immunization", "without immunization", "last step", "MSGR"],
                [
                    [
                        c.label,
                        f"{names[c.model_with]} ({c.attack_with})",
                        f"{names[c.model_without]} ({c.attack_without})",
                        MISSING if c.last_step is None else str(c.last_step),
                        _number(c.msgr) if c.note is None else f"{MISSING} ({c.note})",
                    ]
                    for c in comparisons
                ],
            )
        )
    for comparison in comparisons:
        if not comparison.sgr:
            continue
        blocks.append(
            Heading(
                3,
                f"SGR per step: {names[comparison.model_with]} vs {names[comparison.model_without]}, {comparison.label}",
            )
        )
        rows = []
        for concept, per_step in comparison.sgr.items():
            for step, (m_without, m_with, ratio) in per_step.items():
                rows.append(
                    [
                        concept,
                        str(step),
                        _number(m_without),
                        _number(m_with),
                        _number(ratio) if ratio is not None else f"{MISSING} (M(ref, without) ≤ 0)",
                    ]
                )
        blocks.append(Table(["concept", "step", "M(ref, without)", "M(ref, with)", "SGR"], rows))
    blocks += [Paragraph(note) for note in notes]
    blocks.append(Paragraph(MRSGR_NOTE))
    return blocks


def _attack_sections(
    attacks: list[AttackFolder], metrics: RunMetrics, names: dict[str, str]
) -> tuple[list, list]:
    grids: list = [
        Heading(2, "Samples"),
        Paragraph(
            f"The evaluation's cached generations at each saved step: rows are steps, columns the first "
            f"{GRID_COLUMNS} samples by file name (the same prompts and seeds in every row, a mix of the "
            "evaluated concepts)."
        ),
    ]
    configs: list = [Heading(2, "Configuration")]
    if not attacks:
        grids.append(Paragraph("No attack folders (attack.json) were found under the run folder."))
        configs.append(Paragraph("No attack folders (attack.json) were found under the run folder."))
        return grids, configs
    used_names: set[str] = set()
    for attack in attacks:
        grids.append(Heading(3, attack.relative))
        if attack.problem:
            grids.append(Paragraph(attack.problem))
        made = sample_grid(attack)
        if made is None:
            grids.append(
                Paragraph("No cached samples (steps/step-*/samples/*.png); run diffimmune evaluate.")
            )
        else:
            image, steps = made
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            name = _asset_name("grid-" + attack.relative, used_names)
            model = names.get(attack.model, attack.model or "unknown model")
            caption = f"{attack.relative} ({model}): samples at steps {', '.join(map(str, steps))}"
            grids.append(Picture(name, buffer.getvalue(), caption))
        configs.append(Heading(3, attack.relative))
        if attack.config is None:
            configs.append(Paragraph(attack.problem or "attack.json holds no config."))
        else:
            import yaml

            text = yaml.safe_dump({"model": attack.model, "config": attack.config}, sort_keys=False)
            configs.append(Code("yaml", text))
        if (attack.model, attack.name) not in metrics.values:
            configs.append(Paragraph("This attack has no rows in metrics.csv."))
    return grids, configs


def _asset_name(stem: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "asset"
    name, counter = f"{base}.png", 2
    while name in used:
        name, counter = f"{base}-{counter}.png", counter + 1
    used.add(name)
    return name


# ---------------------------------------------------------------------------------------- entry point
def write_report(
    run_dir: Path,
    title: str | None = None,
    reference_model: str | None = None,
    attack_dirs: list[Path] | None = None,
    model_names: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write RUN/report.md and a self-contained RUN/report.html (plus RUN/report_assets/*.png).

    `reference_model`: a substring of the CSV's model column naming the model without immunization for
    the gap ratios; default: the one model whose path has no 'immun' in it. `attack_dirs`: the attack
    folders to show (default: every one under RUN); `model_names`: display names by model path (default:
    the paths' last components). Returns (markdown, html).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DiffImmuneError(f"run folder {run_dir} does not exist")
    metrics = read_run_metrics(run_dir)
    if reference_model is not None and not any(reference_model in m for m in metrics.models):
        raise DiffImmuneError(
            f"--reference-model '{reference_model}' matches none of the models in {METRICS_FILE}: "
            f"{', '.join(metrics.models)}"
        )
    attacks = find_attack_folders(run_dir, attack_dirs)
    title = title or f"diffimmune report: {run_dir.resolve().name}"
    models = sorted(set(metrics.models) | {a.model for a in attacks if a.model})
    names = short_model_names(models) | {m: n for m, n in (model_names or {}).items() if m in models}
    labels = {key: f"{names[key[0]]} · {key[1]}" for key in metrics.keys}
    methods = {(a.model, a.name): a.method for a in attacks if a.model and a.method}

    blocks: list = [
        Paragraph(
            f"Run folder `{run_dir}`: {len(metrics.keys)} model x attack pair(s) in {METRICS_FILE}, "
            f"{len(attacks)} attack folder(s)."
        ),
        Table(["model", "path"], [[names[m], m] for m in models]),
    ]
    if metrics.repeated:
        repeated = ", ".join(f"{names[m]} · {a}" for m, a in sorted(metrics.repeated))
        blocks.append(
            Paragraph(
                f"Warning: {METRICS_FILE} repeats rows at the same step for {repeated} (two attack folders "
                "with the same name on the same model?); the report keeps the last of each."
            )
        )
    blocks += _summary_section(metrics, names)
    blocks.append(Heading(2, "Curves"))
    curves = _curve_figures(metrics, labels)
    blocks += [Picture(f"{name}.png", png, caption) for name, png, caption in curves]
    if not curves:
        blocks.append(Paragraph("No per-step metrics of target concepts to plot."))
    blocks += _gap_section(metrics, methods, names, reference_model)
    grids, configs = _attack_sections(attacks, metrics, names)
    blocks += grids + configs

    with atomic_folder(run_dir / ASSETS_FOLDER) as assets:
        for block in blocks:
            if isinstance(block, Picture):
                (assets / block.name).write_bytes(block.png)
    markdown_path, html_path = run_dir / "report.md", run_dir / "report.html"
    with atomic_file(markdown_path) as temporary:
        temporary.write_text(_markdown(title, blocks), encoding="utf-8")
    with atomic_file(html_path) as temporary:
        temporary.write_text(_html(title, blocks), encoding="utf-8")
    return markdown_path, html_path
