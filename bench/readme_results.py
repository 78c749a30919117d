"""Regenerate the README's results table from the benchmarks' saved outputs (bench/results/) and the
shipped world model's quality table, between the `results:start` / `results:end` markers.

    python bench/readme_results.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORLD = ROOT / "src" / "diffimmune" / "assets" / "world-default" / "diffimmune" / "quality.json"


def find(pattern: str, file: str) -> str:
    path = RESULTS / file
    if not path.is_file():
        return "not run"
    match = re.search(pattern, path.read_text())
    return match.group(1) if match else "not found"


def relearning_summary(tables: list[dict]) -> str:
    """Per re-learning run (configs/relearning-N.yaml, table.json by bench/relearning_table.py): target
    detection over the LoRA attack's saved steps, retention, FID and MSGR per model."""
    lines = [
        "#### Re-learning after UCE ([docs/relearning](docs/relearning/README.md), `diffimmune run configs/RUN.yaml`)",
        "",
        "| run | targets | model | target detection at steps 0 / 50 / 100 / 200 / 400 | max | other shapes | FID other shapes | MSGR vs erased |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for table in tables:
        targets = ", ".join(table["targets"])
        for row in relearning_rows(table):
            lines.append(f"| {table['run']} | {targets} {row}")
    return "\n".join(lines)


def relearning_rows(table: dict) -> list[str]:
    rows = []
    for model, row in table["models"].items():
        curve = " / ".join(f"{d:.0%}" for d in row["detection"])
        other = "—" if row["other_shapes"] is None else f"{row['other_shapes']:.0%}"
        fid = "—" if row["fid"] is None else f"{row['fid']:.1f}"
        gap = "—" if row["msgr"] is None else f"{row['msgr']:.3f}"
        rows.append(f"| {model} | {curve} | {row['max']:.0%} | {other} | {fid} | {gap} |")
    return rows


def efficacy_summary(results: dict) -> str:
    """Per defence, over the concept sets 1/2/3: target detection after LoRA and after the benign
    fine-tune, the worst case over all attacks, the other shapes' change and the FID change."""
    sets = sorted(results, key=int)
    models: list[str] = []
    for cells in results.values():
        for key in cells:
            model = key.split("|")[0]
            if model not in models:
                models.append(model)

    def row(model: str, attack: str | None, field: str, points: bool = False) -> str:
        values = []
        for size in sets:
            cells = {k.split("|")[1]: v for k, v in results[size].items() if k.split("|")[0] == model}
            if attack is None:
                found = [c[field] for c in cells.values() if c.get(field) is not None]
                value = max(found) if found else None
            else:
                value = cells.get(attack, {}).get(field)
            if value is None:
                values.append("—")
            elif points:
                values.append(f"{value * 100:+.0f}")
            elif field == "fid_change":
                values.append(f"{value:+.0%}")
            else:
                values.append(f"{value:.0%}")
        return " / ".join(values)

    lines = [
        "#### Efficacy matrix, condensed ([bench/results/efficacy.md](bench/results/efficacy.md))",
        "",
        f"Each cell: {' / '.join(sets)} target(s). Target detection after the attack (lower is better), the "
        "worst case over LoRA, DreamBooth, Textual Inversion, Custom Diffusion, full and benign fine-tuning; "
        "the other shapes' detection change (points) and FID change against the erased-only model.",
        "",
        "| defence | after LoRA | after benign fine-tune | worst case | other shapes | FID change |",
        "|---|---|---|---|---|---|",
    ]
    for model in models:
        lines.append(
            f"| {model} | {row(model, 'lora', 'detection')} | {row(model, 'benign', 'detection')} | "
            f"{row(model, None, 'detection')} | {row(model, 'lora', 'retention_change', points=True)} | "
            f"{row(model, 'lora', 'fid_change')} |"
        )
    return "\n".join(lines)


def markdown_tables(text: str) -> list[list[str]]:
    """The tables of a markdown text, in order: each a list of its consecutive `|` lines."""
    tables: list[list[str]] = []
    previous = False
    for line in text.splitlines():
        row = line.startswith("|")
        if row and not previous:
            tables.append([])
        if row:
            tables[-1].append(line)
        previous = row
    return tables


def main() -> None:
    rows = [("benchmark", "measured", "target", "source")]
    rows.append(
        (
            "diffusion loss via functional_call / module forward+backward (tiny model, CPU)",
            find(r"ratio functional / module\s+([\d.]+)", "objective.txt"),
            "<= 1.05",
            "bench/objective.py",
        )
    )
    if WORLD.is_file():
        quality = json.loads(WORLD.read_text())
        known = quality["known"]
        rows.append(
            (
                "world detector shape accuracy (held-out world images)",
                f"{quality['classifier']['shape_accuracy']:.1%}",
                ">= 97%",
                "world build",
            )
        )
        rows.append(
            (
                "world model: prompted shape found in its generations",
                f"{known['shape_accuracy']:.1%}",
                ">= 90%",
                "world build",
            )
        )
        rows.append(
            (
                "world model: prompted style found in its generations",
                f"{known['style_accuracy']:.1%}",
                ">= 80%",
                "world build",
            )
        )
    rows.append(
        (
            "sampling throughput, world model, 25 DDIM steps + CFG",
            find(r"-> ([\d.]+ images/s)", "eval_speed.txt"),
            "",
            "bench/eval_speed.py",
        )
    )
    rows.append(
        (
            "full evaluation of one attack run (3 saved steps)",
            find(r"FID/KID\): ([\d.]+ s)", "eval_speed.txt"),
            "",
            "bench/eval_speed.py",
        )
    )
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows[:1])
    table += "\n|---|---|---|---|\n" + "\n".join("| " + " | ".join(row) + " |" for row in rows[1:])
    for extra in ("attack_curves.md", "speed.md", "demo.md"):
        path = RESULTS / extra
        if path.is_file():
            text = path.read_text().strip()
            table += "\n\n" + ("###" + text if text.startswith("# ") else text)
    efficacy = RESULTS / "efficacy.json"
    if efficacy.is_file():
        table += "\n\n" + efficacy_summary(json.loads(efficacy.read_text()))
    for path in sorted((ROOT / "docs" / "immunization-ii").glob("*/table.md")):
        link = "[docs/immunization-ii](docs/immunization-ii/README.md)"
        title = f"#### GIFT and ResAlign on the whole denoiser, one target: `configs/{path.parent.name}.yaml` ({link})"
        table += f"\n\n{title}\n\n" + path.read_text().strip()
    relearning = sorted((ROOT / "docs" / "relearning").glob("relearning-*/table.json"))
    if relearning:
        table += "\n\n" + relearning_summary([json.loads(path.read_text()) for path in relearning])
    personalisation = ROOT / "docs" / "personalisation" / "README.md"
    if personalisation.is_file():
        titles = (
            "MIMA against heart and moon",
            "IMMA on the whole denoiser (distill 20) against heart and moon",
            "IMMA on the whole denoiser (distill 5, unconditional kept) against heart and moon",
            "one LoRA adversary per target, no merge (distill 5, unconditional kept) against heart and moon",
            "Adam adversaries per target, LoRA or LoRA + DreamBooth (otherwise as above) against heart and moon",
            "Adam LoRA adversaries under the retain projection (E = 0.95), retain weight 10 or 5",
            "under the retain projection at E = 0.9 (seeds 0-2), outer lr 1e-3, LoRA + DreamBooth adversaries",
            "E = 0.9 re-read with 32 generations per target (mean of heart and moon, steps 0 / 50 / 100 / 200 / 400)",
            "the attacks' token (sks or the defended <v1>, <v2>), ResAlign and GIFT (32 generations, steps 0 / 50 / 100 / 200 / 400)",
        )
        for title, rows in zip(titles, markdown_tables(personalisation.read_text()), strict=False):
            link = "([docs/personalisation](docs/personalisation/README.md))"
            table += f"\n\n#### Personalisation, {title} {link}\n\n" + "\n".join(rows)
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = re.sub(
        r"<!-- results:start -->.*<!-- results:end -->",
        f"<!-- results:start -->\n{table}\n<!-- results:end -->",
        text,
        flags=re.S,
    )
    readme.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
