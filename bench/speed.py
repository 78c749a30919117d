"""The cost of one immunization outer step over one plain fine-tuning step on the same batch.

For each method and hypergradient: time `method.step` (one outer step, everything it computes), the plain
fine-tuning step, and a step that fine-tunes only the method's selection, alternating, in one run, and
print the ratio of medians. Targets (issue 5): unrolled IMMA <= 4x; MIMA with N concepts unrolled <= 4N x;
first-order <= 2.2N x.

The plain fine-tuning step is one step of the fine-tuning the method's lower level simulates, as an
attacker takes it, without the immunization around it: a LoRA step for IMMA, a DreamBooth step on the whole
denoiser (with its prior images) for MIMA and Joint, a K/V step for Compose; for GIFT and ResAlign (no
adversary) a step on the method's selection. That is the step the targets' arithmetic counts: a
first-order outer step is N such steps plus an upper pass of about one step per concept (2N, plus 10%),
an unrolled one adds the double backward through them. The ratio over the selection-only step is printed
beside it. Read against that step, a whole-denoiser adversary's N steps alone cost about 1.6N (they compute
every convolution's weight gradient, the selection's step none), so no MIMA step with a DreamBooth lower
level could meet 2.2N (docs/relearning, session 18); the verdict does not read it.

On a shared CPU the machine's speed drifts between cases and repeats (a step of one case can read 50 ms
and of the next 85 ms), so beside the ratio of medians the table gives the *paired* ratio: the median over
repeats of outer_i / plain_i, each pair timed back to back, which cancels a drift slower than one repeat.
The verdict reads the ratio of medians; a row whose two ratios sit on either side of its target is within
the machine's noise.

    python bench/speed.py                     # the world model; writes bench/results/speed.md
    python bench/speed.py --repeats 3 --no-write
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ["star", "square", "triangle"]


def cases():
    yield "imma", "first_order", 1, {}
    yield "imma", "unrolled", 1, {}
    for count in (1, 2, 3):
        yield "mima", "first_order", count, {}
        yield "mima", "unrolled", count, {}
    yield "joint", "unrolled", 2, {}
    yield "compose", "unrolled", 2, {}
    yield "gift", "first_order", 1, {}
    yield "gift", "unrolled", 1, {}
    # ResAlign: one simulated 5-step fine-tune per outer step, K = 5 Richardson iterations.
    finetune = {"finetune_samples": 1, "finetune_steps": (5, 5), "richardson_steps": 5, "retain_weight": 1.0}
    yield "resalign", "first_order", 1, {**finetune, "finetune_methods": ["lora"]}
    yield "resalign", "implicit", 1, {**finetune, "finetune_methods": ["lora"]}
    yield "resalign", "implicit", 1, {**finetune, "finetune_methods": ["full"]}


def targets_for(method: str, hypergradient: str, count: int) -> float | None:
    if method == "imma":
        return 4.0 if hypergradient == "unrolled" else 2.2
    if method in ("mima", "compose"):
        return (4.0 if hypergradient == "unrolled" else 2.2) * count
    return None


# The table's name for the fine-tuning a lower-level adapter simulates (the method's own default adapter,
# `ImmunizeConfig.inner_methods`, says which one a method uses).
FINE_TUNE = {"lora": "LoRA", "dreambooth": "DreamBooth", "custom_diffusion": "K/V"}


def adversary_step(model, method, batch):
    """One fine-tuning step of the method's lower-level adversary (its adapter: LoRA, DreamBooth...) on
    `batch`, as an attacker would take it: None for methods without one (GIFT, ResAlign)."""
    from diffimmune.core.objective import diffusion_loss

    branches = getattr(method, "branches", None)
    if not branches:
        return None
    branch = branches[0]
    named = model.named_parameters()
    theta = {n: named[n].detach() for n in method.theta_names}
    base = method.branch_base(branch, theta)
    start = {k: v.detach() for k, v in branch.adapter.init_state(model, base).items()}

    def step(generator):
        state = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        adapted = {**theta, **branch.adapter.view(model, base, state)}
        loss = diffusion_loss(model, adapted, batch, generator)
        torch.autograd.grad(loss, list(state.values()), allow_unused=True)

    return step


def time_steps(model, method, params, plain_params, batch, repeats):
    """Alternate a selection-only step, the adversary's step (if any) and an outer step `repeats` times (after one
    warm-up of each)."""
    from diffimmune.core.objective import diffusion_loss

    def plain(generator):
        loss = diffusion_loss(model, plain_params, batch, generator)
        torch.autograd.grad(loss, list(plain_params.values()), allow_unused=True)

    def outer(generator):
        method.step(params, 0, generator)

    adversary = adversary_step(model, method, batch)
    timed = [(plain, []), (outer, [])] + ([(adversary, [])] if adversary else [])
    for function, _ in timed:
        function(torch.Generator().manual_seed(1))
    for repeat in range(repeats):
        for function, times in timed:
            start = time.perf_counter()
            function(torch.Generator().manual_seed(repeat))
            times.append(time.perf_counter() - start)
    return timed[0][1], timed[1][1], (timed[2][1] if adversary else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffimmune.data.sources import model_world
    from diffimmune.methods.common import Context, ImmunizeConfig, method_registry
    from diffimmune.models.diffusion_model import load_model
    from diffimmune.recipes.world_build import build_world

    build = build_world("default", progress=False, log=lambda m: None)
    model = load_model(build.model_dir)
    world = model_world(model)
    rows = []
    scratch = ROOT / "runs" / "speed"
    chosen = None if args.methods is None else set(args.methods.split(","))
    for method_name, mode, count, extra in cases():
        if chosen is not None and method_name not in chosen:
            continue
        config = ImmunizeConfig(
            method=method_name,
            concepts=[f"world:shape={s}" for s in SHAPES[:count]],
            hypergradient=mode,
            batch_size=args.batch_size,
            num_images=8,
            num_class_images=8,
            reg_prompts=50,
            **extra,
        )
        context = Context(model, config, scratch, world)
        method = method_registry()[method_name](context)
        named = model.named_parameters()
        params = {n: named[n].detach().clone().requires_grad_(True) for n in method.theta_names}
        # As core/train.py hands them to a step: every entry a leaf that requires grad (ResAlign's LoRA
        # lives in the carried state; the bi-level methods detach theirs).
        params |= {f"inner.{k}": v.clone().requires_grad_(True) for k, v in method.inner_state().items()}
        plain_params = {n: named[n].detach().clone().requires_grad_(True) for n in method.theta_names}
        # The plain step sees the same number of images: one target batch (with prior images if the
        # method's lower level uses them).
        batch = context.batch(context.concepts[0], torch.Generator().manual_seed(0))

        selection_times, outer_times, adversary_times = time_steps(
            model, method, params, plain_params, batch, args.repeats
        )
        # The plain fine-tuning step: the adversary's, where the method has one; else the selection's.
        plain_times = selection_times if adversary_times is None else adversary_times
        ratio = statistics.median(outer_times) / statistics.median(plain_times)
        paired = statistics.median(o / p for o, p in zip(outer_times, plain_times, strict=True))
        target = targets_for(method_name, mode, count)
        label = method_name
        if method_name == "resalign":
            label += f" ({extra['finetune_methods'][0]} fine-tune, 5 steps, K=5)"
        row = {
            "method": label,
            "hypergradient": mode,
            "concepts": count,
            "fine_tune": "selection" if adversary_times is None else FINE_TUNE[config.inner_methods()[0]],
            "plain_ms": 1000 * statistics.median(plain_times),
            "outer_ms": 1000 * statistics.median(outer_times),
            "ratio": ratio,
            "paired": paired,
            "target": target,
            "selection_ms": 1000 * statistics.median(selection_times),
        }
        row["over_selection"] = row["outer_ms"] / row["selection_ms"]
        rows.append(row)
        verdict = "" if target is None else ("pass" if ratio <= target else "FAIL")
        print(
            f"{method_name:8s} {mode:12s} N={count}  {row['fine_tune']} step {row['plain_ms']:7.1f} ms  outer "
            f"{row['outer_ms']:8.1f} ms  ratio {ratio:5.2f} (paired {paired:5.2f})  target "
            f"{'-' if target is None else f'{target:.1f}'} {verdict}  (over the selection-only step "
            f"{row['selection_ms']:6.1f} ms: {row['over_selection']:5.2f})",
            flush=True,
        )
    if args.write:
        lines = [
            "# Speed: one outer step over one plain fine-tuning step",
            "",
            f"Made by `python bench/speed.py` on the world model, batch {args.batch_size}, "
            f"{args.threads} CPU threads, median of {args.repeats} alternating repeats. Paired ratio: the "
            "median over repeats of outer / plain timed back to back (robust to the machine's drift).",
            "",
            "The plain fine-tuning step is one step of the fine-tuning the method's lower level simulates, "
            "as an attacker takes it (LoRA for IMMA, DreamBooth on the whole denoiser with its prior images "
            "for MIMA and Joint, K/V for Compose; the method's selection for GIFT and ResAlign), on the same "
            "batch; the targets are read against it (why: the header of bench/speed.py). The last two "
            "columns read the outer step against a step that fine-tunes only the method's selection.",
            "",
            "| method | hypergradient | concepts | plain fine-tuning step | plain (ms) | outer (ms) | ratio | paired ratio | target | selection-only step (ms) | outer / selection-only step |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        path = ROOT / "bench" / "results" / "speed.md"
        if chosen is not None and path.is_file():  # a subset: keep the other methods' rows as they were
            for line in path.read_text().splitlines():
                cells = [c.strip() for c in line.strip("|").split("|")]
                if (
                    line.startswith("| ")
                    and len(cells) == 11  # a row of this table's layout
                    and cells[0] not in ("method",)
                    and cells[0].split()[0] not in chosen
                ):
                    lines.append(line)
        for r in rows:
            target = "-" if r["target"] is None else f"<= {r['target']:.1f}"
            lines.append(
                f"| {r['method']} | {r['hypergradient']} | {r['concepts']} | {r['fine_tune']} | "
                f"{r['plain_ms']:.1f} | {r['outer_ms']:.1f} | {r['ratio']:.2f} | {r['paired']:.2f} | {target} | "
                f"{r['selection_ms']:.1f} | {r['over_selection']:.2f} |"
            )
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
