"""The command line: one entry point, `diffimmune`, with a subcommand per job.

Every user-fixable problem surfaces as a `DiffImmuneError`, printed as one line on stderr with exit
code 2 and no traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from diffimmune.errors import DiffImmuneError

app = typer.Typer(
    help="Immunize text-to-image diffusion models against malicious fine-tuning, and measure how well it holds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True)


@app.callback()
def global_options(
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            envvar="DIFFIMMUNE_THREADS",
            help="CPU threads for torch (default: torch's own, one per core). On the CPU, float sums depend "
            "on the thread count: the same config and seed give the same numbers at the same count",
        ),
    ] = None,
):
    """Immunize text-to-image diffusion models against malicious fine-tuning, and measure how well it holds."""
    if threads is not None:
        if threads < 1:
            error_console.print(f"[bold red]error:[/] --threads must be >= 1, got {threads}", highlight=False)
            raise typer.Exit(2)
        import torch

        torch.set_num_threads(threads)


def user_errors(function):
    """Turn a DiffImmuneError into `error: <message>` and exit code 2; Ctrl-C into exit 130."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except DiffImmuneError as error:
            error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            error_console.print("interrupted; re-run with --resume to continue from the last checkpoint")
            raise typer.Exit(130) from None

    return wrapper


def parse_seeds(text: str) -> list[int]:
    """`0-7`, `1,5,9` or `4` (meaning 0..3)."""
    try:
        if "-" in text:
            low, high = (int(part) for part in text.split("-", 1))
            return list(range(low, high + 1))
        if "," in text:
            return [int(part) for part in text.split(",")]
        return list(range(int(text)))
    except ValueError:
        raise DiffImmuneError(f"--seeds '{text}' is not a count, a range (0-7) or a list (1,5,9)") from None


ModelOption = Annotated[str, typer.Option("--model", "-m", help="diffusers folder, hub id, or delta folder")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="load pickle weights (can run code)")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="run a model folder's own code")]


def load_model(
    model: str, allow_pickle: bool = False, trust_remote_code: bool = False, device: str | None = None
):
    from diffimmune.models.diffusion_model import load_model as load

    return load(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, device=device)


@app.command()
@user_errors
def generate(
    model: ModelOption,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="a prompt; repeat for several")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG grid to write")] = Path("grid.png"),
    seeds: Annotated[
        str, typer.Option(help="per prompt: a count (8), a range (0-7) or a list (1,5,9)")
    ] = "8",
    steps: Annotated[int, typer.Option(min=1, help="sampling steps")] = 25,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "-g")] = 5.0,
    sampler: Annotated[
        str, typer.Option(help="ddim, dpm, or pipeline (the folder's own scheduler)")
    ] = "ddim",
    scale: Annotated[int, typer.Option(min=1, help="upscale each tile (nearest) for viewing")] = 1,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ] = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Generate images for each prompt and seed and write them as one PNG grid (a row per prompt)."""
    from rich.progress import Progress

    from diffimmune.files import ensure_writable_folder
    from diffimmune.report.grids import make_grid, save_png_atomic

    ensure_writable_folder(out.parent)
    seed_list = parse_seeds(seeds)
    diffusion_model = load_model(model, allow_pickle, trust_remote_code, device)
    prompts = [p for p in prompt for _ in seed_list]
    with Progress(console=error_console, transient=True) as progress:
        task = progress.add_task("generating", total=len(prompts))
        images = diffusion_model.generate(
            prompts,
            seeds=seed_list * len(prompt),
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            progress=lambda n: progress.advance(task, n),
        )
    save_png_atomic(make_grid(images, columns=len(seed_list), scale=scale), out)
    console.print(f"wrote {out} ({len(prompt)} prompt(s) x {len(seed_list)} seed(s))")


def _parameter_counts(model) -> dict[str, int]:
    counts = {
        "unet": sum(p.numel() for p in model.unet.parameters()),
        "text_encoder": sum(p.numel() for p in model.text_encoder.parameters()),
    }
    if model.vae is not None:
        counts["vae"] = sum(p.numel() for p in model.vae.parameters())
    return counts


def _info_model(path: Path, selection: str | None, allow_pickle: bool, trust_remote_code: bool) -> None:
    from diffimmune.models.params import select_parameters

    model = load_model(str(path), allow_pickle, trust_remote_code, device="cpu")
    table = Table(title=f"model {path}", show_header=False)
    table.add_row("source", model.source)
    table.add_row("space", "latent (VAE)" if model.vae is not None else "pixel")
    table.add_row("image size", str(model.image_size))
    table.add_row("denoiser sample", "x".join(str(s) for s in model.sample_shape))
    table.add_row("scheduler", f"{type(model.pipeline_scheduler).__name__} ({model.prediction_type})")
    table.add_row("tokenizer", f"{type(model.tokenizer).__name__}, {len(model.tokenizer)} tokens")
    for component, count in _parameter_counts(model).items():
        table.add_row(f"{component} parameters", f"{count:,}")
    console.print(table)
    if selection:
        chosen = select_parameters(model, selection)
        console.print(
            f"selection '{selection}': {len(chosen)} tensors, {sum(t.numel() for t in chosen.values()):,} parameters"
        )
        for name in chosen:
            console.print(f"  {name}", highlight=False)
    quality = path / "diffimmune" / "quality.md"
    if quality.is_file():
        console.print(quality.read_text(), highlight=False)


def _info_delta(path: Path) -> None:
    from diffimmune.models.diffusion_model import read_delta_manifest

    manifest = read_delta_manifest(path)
    table = Table(title=f"delta {path}", show_header=False)
    for key in ("method", "selection", "base_model", "diffimmune_version"):
        table.add_row(key, str(manifest.get(key, "")))
    table.add_row("changed tensors", str(len(manifest["changed"])))
    table.add_row("hyperparameters", json.dumps(manifest.get("hyperparameters", {})))
    console.print(table)


def _info_run(path: Path) -> None:
    from diffimmune.core.train import latest_checkpoint, metrics_summary, read_metrics

    table = Table(title=f"run {path}", show_header=False)
    checkpoint = latest_checkpoint(path)
    table.add_row("latest checkpoint", str(checkpoint) if checkpoint else "none")
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        try:
            entries = read_metrics(metrics)
        except ValueError as error:
            raise DiffImmuneError(f"{error}; metrics.jsonl holds one JSON object per line") from None
        if entries:
            last = entries[-1]
            table.add_row("logged steps", str(len(entries)))
            table.add_row(
                "last metrics",
                ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()),
            )
            # how the bi-level game went: is the ascent still pushing (target_active) and where the
            # adversaries' target loss sits, over the second half of the run (from the middle entry on)
            late = entries[len(entries) // 2 :]
            first = late[0].get("step", "?")
            for name, (mean, low, high) in metrics_summary(late).items():
                table.add_row(f"{name}, steps {first}+", f"mean {mean:.4g} (min {low:.4g}, max {high:.4g})")
    console.print(table)


@app.command()
@user_errors
def info(
    path: Annotated[
        Path,
        typer.Argument(
            help="a model folder, a delta folder or a run folder (train/, or the folder holding it)"
        ),
    ],
    selection: Annotated[
        str | None, typer.Option(help="also list the parameters this selection picks")
    ] = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Say what a model, delta or run folder holds."""
    if selection:
        from diffimmune.models.params import selection_names

        selection_names(selection, [])  # an unknown name fails here, before anything is loaded or printed
    if not path.exists():
        raise DiffImmuneError(f"{path} does not exist; pass a model, delta or run folder")
    if (path / "model_index.json").is_file():
        _info_model(path, selection, allow_pickle, trust_remote_code)
    elif (path / "manifest.json").is_file():
        _info_delta(path)
        if selection:
            _info_model(path, selection, allow_pickle, trust_remote_code)
    elif (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir():
        _info_run(path)
    elif (path / "train" / "metrics.jsonl").is_file():  # an immunization or attack folder
        _info_run(path / "train")
    else:
        raise DiffImmuneError(
            f"{path} is not a model (model_index.json), delta (manifest.json) or run folder (metrics.jsonl or "
            "train/metrics.jsonl)"
        )


@app.command()
@user_errors
def attack(
    model: ModelOption,
    config: Annotated[Path, typer.Option("--config", "-c", help="attack YAML/JSON (AttackConfig)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="attack folder")],
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="continue from the last checkpoint")
    ] = True,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available)")] = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Fine-tune a model like an adversary; the attacked tensors are saved at every save_at step."""
    from diffimmune.attacks.runner import load_attack_config, run_attack
    from diffimmune.data.sources import model_world
    from diffimmune.files import ensure_writable_folder

    attack_config = load_attack_config(config)
    ensure_writable_folder(out, "attack folder")
    diffusion_model = load_model(model, allow_pickle, trust_remote_code, device)
    run = run_attack(diffusion_model, attack_config, out, resume=resume, world=model_world(diffusion_model))
    steps = ", ".join(str(s) for s in run.checkpoints)
    console.print(f"attack {attack_config.method}: saved steps {steps} in {out}", highlight=False)


@app.command()
@user_errors
def gate(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="the folder of a finished `diffimmune run`")],
    attack: Annotated[
        str,
        typer.Option("--attack", help="an attack of the run's file (per-target attacks are read together)"),
    ],
    max_target: Annotated[
        float, typer.Option("--max-target", help="highest target detection allowed at any saved step, %")
    ] = 20.0,
    max_drop: Annotated[
        float, typer.Option("--max-drop", help="most points the other concepts may lose before the attack")
    ] = 5.0,
    worst_target: Annotated[
        bool, typer.Option("--worst-target", help="hold each target, not their mean, under --max-target")
    ] = False,
    reference: Annotated[
        str | None,
        typer.Option("--reference", help="the model retention is read against (default: erased, else base)"),
    ] = None,
    retention: Annotated[
        Path | None,
        typer.Option(
            "--retention",
            help="metrics.csv of `diffimmune evaluate --model` on the run's models, read for the other concepts "
            "instead of the attacks' step 0",
        ),
    ] = None,
):
    """The release gate: which immunized models of a run hold an attack at every saved step and keep the
    other concepts, and which one to release (writes RUN/gate-ATTACK.json; exit 1 when none passes)."""
    from diffimmune.eval.gate import gate_run, write_gate

    if not 0 <= max_target <= 100:
        raise DiffImmuneError(f"--max-target is a percentage between 0 and 100, got {max_target}")
    if max_drop < 0:
        raise DiffImmuneError(f"--max-drop is the points the other concepts may lose, >= 0; got {max_drop}")
    result = gate_run(run, attack, max_target / 100, max_drop, worst_target, reference, retention)
    reading = "worst target" if worst_target else "mean over targets"
    steps = " / ".join(str(s) for s in result.rows[0].steps)
    console.print(
        f"{run}: attack {attack} on {', '.join(result.targets)}; target detection at steps {steps} ({reading}), "
        f"the other concepts before the attack",
        highlight=False,
    )
    for index, row in enumerate(result.rows):
        curve = row.curve(worst_target)
        kept = "-" if row.kept is None else f"{row.kept:.1%}"
        drop = "" if row.drop_points is None or index == 0 else f" ({0.0 - row.drop_points:+.1f} pts)"
        if index == 0:
            verdict = "reference" + ("" if max(curve) >= 0.8 else " (does not recover: under 80%)")
        else:
            reasons = [] if row.held else [f"target over {max_target:g}%"]
            reasons += [] if row.kept_enough else [f"loses over {max_drop:g} pts"]
            verdict = "[green]pass[/]" if row.passes else "[red]fail[/]: " + ", ".join(reasons)
        console.print(
            f"  {row.model}: {' / '.join(f'{v:.0%}' for v in curve)} (max {max(curve):.0%}); other concepts "
            f"{kept}{drop}; {verdict}",
            highlight=False,
        )
    path = write_gate(result, run)
    if result.chosen is None:
        console.print(f"no immunized model passes; written {path}", highlight=False)
        raise typer.Exit(1)
    console.print(f"release: {result.chosen} (written {path})", highlight=False)


@app.command()
@user_errors
def evaluate(
    run: Annotated[
        Path | None, typer.Option("--run", "-r", help="an attack folder, or a folder of them")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="instead of --run: a model as it is, before any attack (a release candidate; repeat to "
            "compare, e.g. the erased and the immunized one); needs --target and --out",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="with --model: the folder for metrics.csv and samples")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="generations per concept and step")] = 16,
    steps: Annotated[int, typer.Option(min=1, help="sampling steps")] = 25,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "-g")] = 4.0,
    target: Annotated[
        list[str] | None, typer.Option(help="target concept (shape=heart); default: the attack data's")
    ] = None,
    other_concepts: Annotated[
        int | None, typer.Option(help="how many other concepts to check for retention")
    ] = None,
    other_concepts_at: Annotated[
        str,
        typer.Option(
            "--other-concepts-at",
            help="every: read the other concepts at every saved step; start: at the first only",
        ),
    ] = "every",
    fid: Annotated[bool, typer.Option("--fid/--no-fid", help="FID/KID on the other concepts")] = True,
    clip: Annotated[
        str | None,
        typer.Option(help="CLIP checkpoint folder (models outside the world): similarity, CLIP score"),
    ] = None,
    dino: Annotated[str | None, typer.Option(help="DINOv2 checkpoint folder: DINO similarity")] = None,
    lpips: Annotated[
        str | None, typer.Option(help="LPIPS backbone (alex, vgg); needs the extra diffimmune[lpips]")
    ] = None,
    nsfw: Annotated[
        str | None,
        typer.Option(
            help="detection by an NSFW detector: nudenet (extra diffimmune[nsfw], AGPL files) or "
            "opennsfw (extra diffimmune[opennsfw], Apache-2.0/BSD)"
        ),
    ] = None,
    safe_data: Annotated[
        str | None,
        typer.Option("--safe-data", help="captioned folder[::filter] of concepts to keep (retention, FID)"),
    ] = None,
):
    """Compute every metric at every saved attack step; writes RUN/metrics.csv (long format). With --model,
    the same metrics for models as they are (step 0, attack "-"), and a table of targets and kept concepts."""
    from diffimmune.eval.evaluate import EvalSettings, evaluate_run

    if other_concepts_at not in ("every", "start"):
        raise DiffImmuneError(f"--other-concepts-at is every or start, got '{other_concepts_at}'")
    settings = EvalSettings(
        samples=samples,
        steps=steps,
        guidance_scale=guidance_scale,
        other_concepts=other_concepts,
        other_concepts_at=other_concepts_at,
        fid=fid,
        clip=clip,
        dino=dino,
        lpips=lpips,
        nsfw=nsfw,
        safe_data=safe_data,
    )
    log = lambda m: error_console.print(m, highlight=False)  # noqa: E731
    if (run is None) == (model is None):
        raise DiffImmuneError(
            "give --run (attack folders) or --model (models as they are), not both or neither"
        )
    if model is not None:
        from diffimmune.eval.evaluate import evaluate_models

        if out is None:
            raise DiffImmuneError("--model needs --out, the folder for metrics.csv and the samples")
        path, lines = evaluate_models(model, out, settings, target or [], log=log)
        for line in lines:
            console.print(line, highlight=False, soft_wrap=True)
        console.print(f"wrote {path}", highlight=False)
        return
    path = evaluate_run(run, settings, target, log=log)
    console.print(f"wrote {path}", highlight=False)


@app.command()
@user_errors
def report(
    run: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="a run folder holding metrics.csv and attack folders")
    ],
    title: Annotated[str | None, typer.Option(help="the report's title (default: the folder's name)")] = None,
    reference_model: Annotated[
        str | None,
        typer.Option(
            "--reference-model",
            help="part of the model path without immunization, for the gap ratios "
            "(default: the one model without 'immun' in its path)",
        ),
    ] = None,
):
    """Write RUN_DIR/report.md and a self-contained RUN_DIR/report.html: tables, curves, gap ratios, samples."""
    from diffimmune.report.report import write_report

    markdown, html = write_report(run, title=title, reference_model=reference_model)
    console.print(f"wrote {markdown} and {html}", highlight=False)


def split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def one_or_list(parts: list[str]) -> str | list[str] | None:
    """A comma-separated option's parts: None when empty, the one value, or the list."""
    return None if not parts else parts[0] if len(parts) == 1 else parts


def concept_specs(concepts: str, data: str | None, world) -> list[str]:
    """`star,heart` -> data strings: world:shape=star on a world model, DATA::shape=star with --data."""
    from diffimmune.data.sources import concept_spec

    specs = []
    for concept in split_list(concepts):
        spec = concept_spec(concept, data, world)
        if spec is None:
            raise DiffImmuneError(
                f"concept '{concept}' needs data: pass --data FOLDER (a captioned image folder with a "
                "label column) or a data string such as FOLDER::style=vangogh"
            )
        specs.append(spec)
    if not specs:
        raise DiffImmuneError("--concepts is empty; name at least one concept (e.g. --concepts star)")
    return specs


def export_model(diffusion_model, export: Path | None) -> None:
    """With --export, write the (erased / immunized) model as a full diffusers folder."""
    if export is not None:
        diffusion_model.save_pretrained(export)
        console.print(f"full diffusers folder in {export}", highlight=False)


def run_immunization(diffusion_model, immunize_config, out: Path, resume: bool, export: Path | None):
    from diffimmune.data.sources import model_world
    from diffimmune.methods.common import immunize

    run = immunize(
        diffusion_model,
        immunize_config,
        out,
        resume=resume,
        world=model_world(diffusion_model),
        log=lambda m: console.print(m, highlight=False),
    )
    export_model(diffusion_model, export)
    return run


@app.command()
@user_errors
def erase(
    model: ModelOption,
    concepts: Annotated[str, typer.Option(help="comma-separated concepts to erase (e.g. star,heart)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="delta (uce) or run folder (esd) to write")],
    method: Annotated[str, typer.Option(help="erasure method: uce or esd")] = "uce",
    guide: Annotated[
        str, typer.Option(help="UCE: guide concept(s) the erased ones map to (comma list or one)")
    ] = "",
    preserve: Annotated[str | None, typer.Option(help="UCE: comma-separated concepts to preserve")] = None,
    lamb: Annotated[float, typer.Option(help="UCE regulariser toward the original weights")] = 0.5,
    erase_scale: Annotated[float, typer.Option(help="UCE erase scale")] = 1.0,
    preserve_scale: Annotated[float, typer.Option(help="UCE preserve scale")] = 1.0,
    variant: Annotated[str, typer.Option(help="ESD: x (cross-attention) or u (the rest)")] = "x",
    negative_guidance: Annotated[float, typer.Option(help="ESD: eta")] = 1.0,
    steps: Annotated[int, typer.Option(min=1, help="ESD: training steps")] = 200,
    learning_rate: Annotated[float, typer.Option(help="ESD: learning rate")] = 1e-4,
    data: Annotated[str | None, typer.Option(help="ESD: captioned image folder with the concepts")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="ESD: continue a run")] = True,
    export: Annotated[Path | None, typer.Option(help="also write a full diffusers folder here")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Erase concepts from a model: UCE's closed-form edit or ESD's fine-tune; writes a delta."""
    from diffimmune.config import validate_config
    from diffimmune.files import ensure_writable_folder
    from diffimmune.methods.uce import UCEConfig, erase_with_uce

    if method not in ("uce", "esd"):
        raise DiffImmuneError(f"unknown erasure method '{method}'; available: uce, esd")
    if variant not in ("x", "u"):
        raise DiffImmuneError(f"--variant must be x or u, got '{variant}'")
    erase_list = split_list(concepts)
    guides = split_list(guide) or [""]
    ensure_writable_folder(out.parent)
    diffusion_model = load_model(model, allow_pickle, trust_remote_code, device)
    if method == "esd":
        from diffimmune.data.sources import model_world
        from diffimmune.methods.common import ImmunizeConfig

        immunize_config = ImmunizeConfig(
            method="esd",
            concepts=concept_specs(concepts, data, model_world(diffusion_model)),
            esd_variant=variant,
            negative_guidance=negative_guidance,
            steps=steps,
            learning_rate=learning_rate,
        )
        run_immunization(diffusion_model, immunize_config, out, resume, export)
        return
    uce_config = validate_config(
        {
            "concepts": erase_list,
            "guide": guides,
            "preserve": split_list(preserve),
            "lamb": lamb,
            "erase_scale": erase_scale,
            "preserve_scale": preserve_scale,
        },
        UCEConfig,
        "erase options",
    )
    erase_with_uce(diffusion_model, uce_config, out)
    console.print(f"erased {', '.join(erase_list)} with UCE: delta in {out}", highlight=False)
    export_model(diffusion_model, export)


@app.command()
@user_errors
def immunize(
    model: ModelOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder (the result lands in OUT/delta)")],
    method: Annotated[
        str | None, typer.Option(help="imma, mima, joint, compose, esd, gift or resalign")
    ] = None,
    concepts: Annotated[
        str | None, typer.Option(help="comma-separated target concepts (star,heart) or data strings")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="ImmunizeConfig YAML/JSON; flags override it")
    ] = None,
    data: Annotated[str | None, typer.Option(help="captioned image folder holding the concepts")] = None,
    hypergradient: Annotated[
        str | None, typer.Option(help="first_order or unrolled; resalign: implicit or first_order")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="outer steps")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="outer learning rate")] = None,
    inner_method: Annotated[
        str | None,
        typer.Option(
            help="lora, dreambooth, textual_inversion, custom_diffusion, full; comma-separated for one "
            "adversary of each kind (lora,dreambooth)"
        ),
    ] = None,
    inner_optimizer: Annotated[
        str | None,
        typer.Option(help="bi-level methods' lower level: sgd (the papers) or adam (the attacks')"),
    ] = None,
    inner_learning_rate: Annotated[
        str | None, typer.Option(help="lower-level step size; comma-separated, one per --inner-method kind")
    ] = None,
    inner_steps: Annotated[int | None, typer.Option(min=1, help="lower-level steps per outer step")] = None,
    max_loss: Annotated[
        float | None, typer.Option(help="stop ascending a target's loss once it exceeds this (e.g. 0.3)")
    ] = None,
    inner_catch_up: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="bi-level methods, with --max-loss: up to this many extra adversary steps per outer step, "
            "until one starts with every adversary's loss within it (that step kept)",
        ),
    ] = None,
    inner_restart: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="bi-level methods: every this many outer steps the carried adversaries start again from the "
            "released weights (0: never)",
        ),
    ] = None,
    average_from: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="release the mean of the trained tensors over the steps after this one (iterate averaging)",
        ),
    ] = None,
    selection: Annotated[
        str | None, typer.Option(help="released tensors to train (attn, xattn, ...)")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="prompt template ({token}, {colour} ...)")] = None,
    tokens: Annotated[
        str | None, typer.Option(help="comma-separated placeholder tokens, one per concept")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    beta: Annotated[
        float | None, typer.Option(help="GIFT: weight of representation noising (0: off)")
    ] = None,
    anchor_weight: Annotated[
        float | None,
        typer.Option(
            help="GIFT, ResAlign, IMMA, MIMA: weight of ESD's loss at the sampler's states for the target "
            "prompts (0: off)"
        ),
    ] = None,
    anchor_refresh: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="GIFT, ResAlign, IMMA, MIMA: re-record the anchor's states from the trained model every N "
            "steps",
        ),
    ] = None,
    anchor_selection: Annotated[
        str | None,
        typer.Option(
            help="GIFT, ResAlign, IMMA, MIMA: the trained tensors the anchor reaches (a selection such as "
            "xattn; default all)"
        ),
    ] = None,
    anchor_reference: Annotated[
        str | None,
        typer.Option(
            help="GIFT, ResAlign, IMMA, MIMA: the model whose predictions make the anchor's erasure target "
            "(default: the model immunized); give the model before an erasure when immunizing an erased one"
        ),
    ] = None,
    relearn_weight: Annotated[
        float | None, typer.Option(help="ResAlign: weight of the harm after a simulated fine-tune (0: off)")
    ] = None,
    retain_weight: Annotated[
        float | None, typer.Option(help="weight of the retain loss on the other concepts (0: off)")
    ] = None,
    retain_loss: Annotated[
        str | None,
        typer.Option(
            help="diffusion (fit the retain images), distill (keep the starting model's predictions), "
            "guided (keep its guided predictions, at --retain-guidance-scale) or rollout (keep where its "
            "guided sampler goes over --retain-rollout-steps steps; needs --retain-states sampler)"
        ),
    ] = None,
    retain_unconditional: Annotated[
        bool | None,
        typer.Option(
            "--retain-unconditional/--no-retain-unconditional",
            help="the retain loss also keeps the empty-prompt predictions that guidance amplifies",
        ),
    ] = None,
    retain_sampling: Annotated[
        str | None,
        typer.Option(help="uniform, or hard: draw more of the retain images the defence has drifted on most"),
    ] = None,
    retain_states: Annotated[
        str | None,
        typer.Option(
            help="noised (the retain images at random timesteps) or sampler (the starting model's own "
            "sampling trajectories on the retain prompts; needs --retain-loss distill or guided)"
        ),
    ] = None,
    retain_rollout_steps: Annotated[
        int | None,
        typer.Option(help="--retain-loss rollout: sampler steps from each recorded state (default 3)"),
    ] = None,
    retain_guidance_scale: Annotated[
        float | None,
        typer.Option(help="guidance of --retain-loss guided and of the --retain-states sampler (default 4)"),
    ] = None,
    retain_projection: Annotated[
        float | None,
        typer.Option(
            help="keep each trained layer's change out of the directions its retain inputs take: the share "
            "of their energy kept, e.g. 0.99 (default off)"
        ),
    ] = None,
    retain_projection_target_words: Annotated[
        bool | None,
        typer.Option(
            "--retain-projection-target-words/--no-retain-projection-target-words",
            help="with --retain-projection: cross-attention K/V also keep their outputs on the target word's "
            "embeddings, so the erasure the model starts from stays",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="continue from the last checkpoint")
    ] = True,
    export: Annotated[Path | None, typer.Option(help="also write a full diffusers folder here")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Immunize a model against target concepts (IMMA, MIMA, Joint, Compose, GIFT, ResAlign; ESD as a trained eraser)."""
    from diffimmune.config import validate_config
    from diffimmune.data.sources import model_world
    from diffimmune.files import ensure_writable_folder
    from diffimmune.methods.common import ImmunizeConfig, load_immunize_config

    ensure_writable_folder(out, "immunization folder")
    settings = load_immunize_config(config).model_dump(exclude_unset=True) if config else {}
    diffusion_model = load_model(model, allow_pickle, trust_remote_code, device)
    flags = {
        "method": method,
        "hypergradient": hypergradient,
        "steps": steps,
        "learning_rate": learning_rate,
        "inner_method": one_or_list(split_list(inner_method)),
        "inner_optimizer": inner_optimizer,
        "inner_learning_rate": one_or_list(split_list(inner_learning_rate)),
        "inner_steps": inner_steps,
        "max_loss": max_loss,
        "inner_catch_up": inner_catch_up,
        "inner_restart": inner_restart,
        "average_from": average_from,
        "selection": selection,
        "prompt": prompt,
        "tokens": split_list(tokens) or None,
        "seed": seed,
        "beta": beta,
        "anchor_weight": anchor_weight,
        "anchor_refresh": anchor_refresh,
        "anchor_selection": anchor_selection,
        "anchor_reference": anchor_reference,
        "relearn_weight": relearn_weight,
        "retain_weight": retain_weight,
        "retain_loss": retain_loss,
        "retain_unconditional": retain_unconditional,
        "retain_sampling": retain_sampling,
        "retain_states": retain_states,
        "retain_guidance_scale": retain_guidance_scale,
        "retain_rollout_steps": retain_rollout_steps,
        "retain_projection": retain_projection,
        "retain_projection_target_words": retain_projection_target_words,
    }
    if concepts is not None:
        flags["concepts"] = concept_specs(concepts, data, model_world(diffusion_model))
    settings.update({k: v for k, v in flags.items() if v is not None})
    for required in ("method", "concepts"):
        if required not in settings:
            raise DiffImmuneError(f"--{required} is missing; pass it or set it in --config")
    immunize_config = validate_config(settings, ImmunizeConfig, "immunize options")
    run_immunization(diffusion_model, immunize_config, out, resume, export)


def _run_plan(plan, out: Path, dry_run: bool, progress: bool = True):
    from diffimmune.pipeline import build_stages, describe_plan, run_experiment

    if dry_run:
        for line in describe_plan(plan, build_stages(plan, out)):
            console.print(line, highlight=False, soft_wrap=True)
        return None
    return run_experiment(plan, out, progress=progress, log=lambda m: error_console.print(m, highlight=False))


@app.command()
@user_errors
def run(
    experiment: Annotated[
        Path, typer.Argument(metavar="EXPERIMENT", help="experiment YAML/JSON (see configs/)")
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run folder (default: runs/<name>)")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the stages, what is cached and what each costs")
    ] = False,
    defences: Annotated[
        str | None,
        typer.Option(
            "--defences",
            help="only these defences of the file (comma-separated names); the erased model stays, and the "
            "run's report keeps the file's other rows already done",
        ),
    ] = None,
    attacks: Annotated[
        str | None, typer.Option("--attacks", help="only these attacks of the file (comma-separated names)")
    ] = None,
):
    """Run an experiment: erase -> immunize -> attack sweep -> evaluate -> report, each stage cached."""
    from diffimmune.pipeline import load_run

    def names(value: str | None) -> list[str] | None:
        return None if value is None else split_list(value)

    plan, whole = load_run(experiment, names(defences), names(attacks))
    out = out or Path("runs") / plan.experiment.name
    result = _run_plan(plan, out, dry_run)
    if result is None:
        return
    if defences is not None or attacks is not None:
        # The run's combined files (experiment.json, metrics.csv, the report) keep every row of the file
        # done so far, not only the subset: the whole file as read at the start, running nothing.
        from diffimmune.pipeline import combine_run

        seconds = result.seconds
        result = combine_run(whole, out)
        result.seconds += seconds
    console.print(f"report: {result.report} ({result.seconds / 60:.1f} min)", highlight=False)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder")] = Path("runs/demo"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
):
    """The main job on the embedded default: erase two shapes with UCE, immunize with MIMA, attack both
    models with LoRA, evaluate and report (report.html), then print a three-line summary."""
    from diffimmune.files import atomic_file
    from diffimmune.pipeline import DEMO_EXPERIMENT, build_stages, summary_lines, validate_experiment

    plan = validate_experiment(DEMO_EXPERIMENT, "demo")
    result = _run_plan(plan, out, dry_run)
    if result is None:
        return
    lines = summary_lines(result.summary())
    with atomic_file(out / "summary.md") as temporary:  # the same lines, kept with the run
        temporary.write_text(
            "\n".join(["# diffimmune demo", "", *[f"- {line}" for line in lines], ""])
            + f"\nMade by `diffimmune demo` in {result.seconds / 60:.1f} min (stages cached before it: "
            f"{len(build_stages(plan, out)) - len(result.executed)}).\n"
        )
    console.print(f"report: {result.report.resolve()}", highlight=False)
    for line in lines:
        console.print(line, highlight=False)
    console.print(f"done in {result.seconds / 60:.1f} min", highlight=False)


world_app = typer.Typer(
    help="The embedded default: a generated concept world and a tiny model trained on it."
)
base_app = typer.Typer(help="Pre-train the tiny text-to-image model on any captioned image folder.")
app.add_typer(world_app, name="world")
app.add_typer(base_app, name="base")


@world_app.command("build")
@user_errors
def world_build(
    preset: Annotated[
        str, typer.Option(help="fast (tests, ~2 min) or default (the quality bar)")
    ] = "default",
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="train again from scratch instead of using cache/shipped")
    ] = False,
    cache: Annotated[
        Path | None, typer.Option(help="cache folder (default: $DIFFIMMUNE_CACHE or ~/.cache/diffimmune)")
    ] = None,
    export: Annotated[Path | None, typer.Option(help="also copy the finished model folder here")] = None,
):
    """Generate the concept world, train its detector and pre-train the tiny model (cached, resumable)."""
    import shutil
    import time

    from diffimmune.files import atomic_folder
    from diffimmune.recipes.world_build import EXTRA_FOLDER, build_world

    began = time.perf_counter()
    build = build_world(
        preset, root=cache, rebuild=rebuild, log=lambda m: error_console.print(m, highlight=False)
    )
    console.print((build.model_dir / EXTRA_FOLDER / "quality.md").read_text(), highlight=False)
    if export is not None:
        with atomic_folder(export) as temporary:
            shutil.copytree(build.model_dir, temporary, dirs_exist_ok=True)
        console.print(f"exported to {export}")
    state = {"built": "built", "cache": "found (cached)", "shipped": "copied from the shipped assets"}[
        build.origin
    ]
    console.print(
        f"world model {state}: {build.model_dir}  [{time.perf_counter() - began:.1f} s]", highlight=False
    )


@world_app.command("ship")
@user_errors
def world_ship(
    model_dir: Annotated[Path, typer.Argument(help="a built world model folder (world build prints it)")],
    destination: Annotated[
        Path | None, typer.Option(help="default: the package's assets/world-<preset>")
    ] = None,
):
    """Copy a built world model into the package assets in float16 and re-measure its quality table."""
    from diffimmune.recipes.world_build import ship_world

    if not (model_dir / "diffimmune" / "build.json").is_file():
        raise DiffImmuneError(f"{model_dir} is not a built world model (no diffimmune/build.json)")
    shipped = ship_world(model_dir, destination, log=lambda m: console.print(m, highlight=False))
    console.print((shipped / "diffimmune" / "quality.md").read_text(), highlight=False)


@base_app.command("train")
@user_errors
def base_train(
    data: Annotated[
        Path, typer.Option(help="image folder with metadata.jsonl or metadata.csv (file_name, text)")
    ],
    out: Annotated[Path, typer.Option(help="run folder; the model lands in OUT/model")],
    preset: Annotated[str, typer.Option(help="model size and steps: fast or default")] = "default",
    steps: Annotated[int | None, typer.Option(min=1, help="override the denoiser's training steps")] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="continue from the last checkpoint")
    ] = True,
):
    """Pre-train the tiny text-to-image model (tokenizer, VAE, text encoder, UNet) on a captioned folder."""
    from diffimmune.data.concepts import ConceptSet
    from diffimmune.files import ensure_writable_folder
    from diffimmune.recipes.pretrain import pretrain
    from diffimmune.recipes.world_build import preset_config

    ensure_writable_folder(out, "run folder")
    concept_set = ConceptSet.from_folder(data)
    config = preset_config(preset).pretrain
    if steps is not None:
        config = config.model_copy(update={"train": config.train.model_copy(update={"steps": steps})})
    model_dir = pretrain(concept_set, config, out, resume=resume)
    console.print(f"model written to {model_dir}", highlight=False)


def main() -> None:
    app(prog_name="diffimmune")


if __name__ == "__main__":
    sys.exit(main())
