"""One target's table of a pipeline run with a LoRA re-learning attack (per target, `lora-<target>`) and
a benign fine-tune (`benign`), e.g. configs/immunization-ii-unet.yaml: per model, the target's detection
at every saved step of each attack, the other shapes' detection and the FID of their generations (world
encoder) before any attack, both also as the change against the erased model. Prints markdown; --out
writes it to a file (the README's results read docs/immunization-ii/*/table.md).

    python bench/defence_table.py runs/immunization-ii-unet --out docs/immunization-ii/immunization-ii-unet/table.md

`--attacks A,B` gives one column per named LoRA attack (A-<target>, B-<target>; default lora), e.g. two draws
of the same attack (`--attacks ''`: none, for a run with only the benign fine-tune); `--benign ''` drops the
benign column and `--no-kept` the other shapes and FID (for a run that evaluated the target only).
`--update` keeps the rows of an existing --out table for the models this run does not hold (rows measured in
an earlier run folder with the same columns); the erased model's row must then read the same, or the tables
are not comparable and nothing is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from relearning_table import ERASED, metric_series, require_attacks

from diffimmune.eval.evaluate import SAFE_CONCEPT


def defence_rows(
    run: Path, attacks: tuple[str, ...] = ("lora",), benign: str = "benign", kept: bool = True
) -> list[str]:
    experiment = json.loads((run / "experiment.json").read_text())
    targets = [t.partition("=")[2] or t for t in experiment["targets"]]
    if len(targets) != 1:
        raise SystemExit(f"{run}: the table is for one target, the run has {len(targets)}")
    target = f"shape={targets[0]}"
    series = metric_series(run)
    if attacks:
        require_attacks(run, series, list(attacks), targets)
    models = sorted({key[0] for key in series}, key=lambda m: (m != ERASED, m))

    def curve(model: str, attack: str) -> str:
        values = series.get((model, attack, target, "detection"), {})
        if not values:
            return "—"
        text = " / ".join(f"{values[s]:.0%}".rstrip("%") for s in sorted(values)) + "%"
        return f"{text} (max {max(values.values()):.0%})"

    def before(model: str) -> tuple[float | None, float | None]:
        others = [
            c[0]
            for (m, _a, concept, metric), c in series.items()
            if m == model and metric == "detection" and concept.startswith("shape=") and concept != target
            if 0 in c
        ]
        fid = [
            c[0]
            for (m, _a, concept, metric), c in series.items()
            if m == model and concept == SAFE_CONCEPT and metric == "fid_world" and 0 in c
        ]
        return (sum(others) / len(others) if others else None, sum(fid) / len(fid) if fid else None)

    base_others, base_fid = before(ERASED)
    steps = sorted({s for (m, a, c, metric), v in series.items() if c == target for s in v})
    names = [f"LoRA re-learning ({a})" if attacks != ("lora",) else "LoRA re-learning" for a in attacks]
    header = [f"{name}, steps {' / '.join(map(str, steps))}" for name in names]
    header += ["benign fine-tune"] if benign else []
    header += ["other shapes", "FID, other shapes"] if kept else []
    rows = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for model in models:
        cells = [curve(model, f"{a}-{targets[0]}") for a in attacks]
        if cells and all(c == "—" for c in cells):
            continue  # not attacked so in this run
        cells += [curve(model, benign)] if benign else []
        if kept:
            others, fid = before(model)
            other_text = f"{others:.0%}" if others is not None else "—"
            fid_text = f"{fid:.1f}" if fid is not None else "—"
            if model != ERASED and others is not None and base_others is not None:
                other_text += f" ({(others - base_others) * 100:+.0f} pts)"
            if model != ERASED and fid is not None and base_fid:
                fid_text += f" ({fid / base_fid - 1:+.0%})"
            cells += [other_text, fid_text]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return rows


def merged_rows(old: list[str], new: list[str], path: Path) -> list[str]:
    """`new`'s header and rows plus `old`'s rows of models `new` lacks, erased first, then by name."""
    if old[:2] != new[:2]:
        raise SystemExit(f"{path}: its columns differ from this run's; write it without --update")

    def model(line: str) -> str:
        return line.strip("|").split("|")[0].strip()

    fresh = {model(line): line for line in new[2:]}
    kept = {model(line): line for line in old[2:] if line.startswith("| ")}
    if ERASED in fresh and ERASED in kept and kept[ERASED] != fresh[ERASED]:
        raise SystemExit(
            f"{path}: the erased model reads {kept[ERASED]!r} there and {fresh[ERASED]!r} here; the rows "
            "are not comparable, write it without --update"
        )
    rows = {**kept, **fresh}
    return new[:2] + [rows[m] for m in sorted(rows, key=lambda m: (m != ERASED, m))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write")
    parser.add_argument("--attacks", default="lora", help="comma-separated LoRA attack names (NAME-<target>)")
    parser.add_argument("--benign", default="benign", help="the benign fine-tune's attack name ('': none)")
    parser.add_argument("--no-kept", action="store_true", help="leave out the other shapes and FID")
    parser.add_argument(
        "--update", action="store_true", help="keep --out's rows of the models this run does not hold"
    )
    args = parser.parse_args()
    attacks = tuple(name for name in args.attacks.split(",") if name)
    rows = defence_rows(args.run, attacks, args.benign, not args.no_kept)
    if args.update and args.out and args.out.is_file():
        rows = merged_rows(args.out.read_text().splitlines(), rows, args.out)
    text = "\n".join(rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
