"""The bi-level immunizers' shared machinery (IMMA, MIMA, Joint, Compose).

The released tensors theta (the upper-level selection) are trained to *maximise* the diffusion loss of
the model an adversary obtains from them. The adversary is the lower level: one adapter per branch
(IMMA: one, on all target data; MIMA: one per concept), taking `inner_steps` steps on its state: SGD (the
papers), or Adam (`inner_optimizer: adam`), the attacks' own optimiser, whose moments and step count are
carried with the state; the unrolled hypergradient differentiates through the moments of the outer step's
own inner steps (those carried from earlier outer steps are constants, as the state is).

A branch's state is stored as a residual r on top of the adapter's starting point phi0(theta), so that
the adapted weights view(theta, phi0(theta) + r) stay a differentiable function of theta for every
adapter (for DreamBooth phi0(theta) = theta), and r can persist between outer steps (`inner_warm_start`,
as the official code keeps its LoRA training across the outer loop). r lives in the training loop's
checkpoints, so a resumed run ends where the uninterrupted one does.

Hypergradients (`hypergradient`):
- `first_order` (the official code): adapt without a graph, then the gradient of the upper loss w.r.t.
  the weights the model is finally called with (the adapted, or merged, ones), read at the names of theta;
- `unrolled` (the papers): keep the graph of the inner steps (and of the merge) and differentiate the
  upper loss w.r.t. theta exactly, through `core.hypergrad.hypergradient`.

`anchor_weight` (default 0, the papers) adds GIFT's and ResAlign's sampler anchor (`SamplerAnchor`, ESD's
erasure loss at the states the guided sampler visits for the target prompts) on the released weights, beside
the retain term; `anchor_refresh` re-records those states from the released weights being trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffimmune.core.hypergrad import adam_step, adapt, hypergradient
from diffimmune.core.objective import (
    Batch,
    batch_losses,
    diffusion_loss,
    distillation_loss,
    rollout_loss,
    with_null_prompts,
)
from diffimmune.core.train import StepOutput
from diffimmune.methods.common import (
    ANCHOR_STATES,
    Context,
    Method,
    SamplerAnchor,
    inner_of,
    store_inner,
    theta_of,
)

THETA = "theta:"
# The Adam lower level's carried state, beside each branch's residual "index/name".
ADAM_MOMENTS = ("adam_first:", "adam_second:")
ADAM_COUNT = "adam_count"


@dataclass
class Branch:
    """One lower-level adversary: its adapter and the concepts whose data it trains on."""

    adapter: object
    concepts: list[int]
    base_names: list[str]
    lr: float  # its lower-level step size
    label: str = ""  # names its own adapted model in the step's metrics (target_loss_own_<label>)


@dataclass
class CaughtUp:
    """The lower level's state after `BilevelMethod.catch_up`, and how many extra steps it took."""

    state: dict[str, Tensor]
    steps: int


class BilevelMethod(Method):
    """Subclasses say how branches are formed (`branches`) and how the upper level sees the adapted
    models (`outer_params`: IMMA uses the one adapted model, MIMA merges them; `outer_views` when the
    upper loss reads several models)."""

    def __init__(self, context: Context):
        super().__init__(context)
        self.branches = self.make_branches()
        named = self.model.named_parameters()
        needed = {n for branch in self.branches for n in branch.base_names} | set(self.extra_base_names())
        self.frozen = {n: named[n].detach() for n in needed if n not in set(self.theta_names)}
        self.adam = self.config.inner_optimizer == "adam"
        # `anchor_weight`: ESD's loss at the sampler's states for the target prompts, on the released weights.
        self.anchor = None
        if self.config.anchor_weight > 0:
            self.anchor = SamplerAnchor(
                self.model, self.config, context.concepts, self.theta_names, context.out_dir
            )

    # -- what subclasses decide
    def make_branches(self) -> list[Branch]:
        raise NotImplementedError

    def extra_base_names(self) -> list[str]:
        return []

    def outer_params(self, theta: dict[str, Tensor], adapted: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The weights the upper loss calls the model with, from each branch's adapted weights."""
        raise NotImplementedError

    def outer_views(
        self, theta: dict[str, Tensor], adapted: list[dict[str, Tensor]]
    ) -> list[tuple[dict[str, Tensor], list[int], str]]:
        """Every model the upper loss is read on, each with the concepts whose target batches score it
        and a name for the step's metrics: by default the one model of `outer_params`, on every concept."""
        return [(self.outer_params(theta, adapted), list(range(len(self.context.concepts))), "model")]

    def own_views(self, adapted: list[dict[str, Tensor]]) -> list[tuple[dict[str, Tensor], list[int], str]]:
        """Each branch's own adapted model, scored on the branch's concepts."""
        return [
            (params, branch.concepts, "own_" + branch.label)
            for params, branch in zip(adapted, self.branches, strict=True)
        ]

    def adapter_kinds(self) -> list[tuple[str, float]]:
        """The lower level's adapters and their step sizes: one adversary of each per branch."""
        return list(zip(self.config.inner_methods(), self.config.inner_learning_rates(), strict=True))

    def outer_loss(
        self, params: dict[str, Tensor], batches: list[Batch], generator, terms: list[float] | None = None
    ) -> Tensor:
        """Summed diffusion loss of the target batches (one per concept) under `params`; maximised. Each
        concept's value is appended to `terms` when given."""
        total = 0.0
        for loss in batch_losses(self.model, params, batches, generator):  # one denoiser pass for all
            value = loss.item()  # one device sync per term, for the metric and the bound
            if terms is not None:
                terms.append(value)
            if self.config.max_loss is not None and value > self.config.max_loss:
                loss = loss.detach()  # high enough: spend the capacity on the other concepts
            total = total + loss
        if not total.requires_grad:  # every concept past max_loss: a zero gradient, not an autograd error
            total = total + 0.0 * sum(p.sum() for p in params.values() if p.requires_grad)
        return total

    # -- the adapters as functions of theta
    def branch_base(self, branch: Branch, theta: dict[str, Tensor]) -> dict[str, Tensor]:
        """The released tensors the branch's adapter reads: theta where it has them, else frozen."""
        released = {**self.frozen, **theta}
        return {n: released[n] for n in branch.base_names}

    def adapted_params(self, branch: Branch, theta: dict[str, Tensor], residual: dict[str, Tensor]):
        """view(theta, phi0(theta) + r): every tensor the adapted model is called with."""
        base = self.branch_base(branch, theta)
        state = branch.adapter.shifted_state(self.model, base, residual)
        return {**theta, **branch.adapter.view(self.model, base, state)}

    def released_outer_views(self, z: dict[str, Tensor]) -> list[tuple[dict[str, Tensor], list[int], str]]:
        """`outer_views` from theta and every branch's residual in `z`."""
        theta, residuals = self.split(z)
        adapted = [self.adapted_params(b, theta, residuals[i]) for i, b in enumerate(self.branches)]
        return self.outer_views(theta, adapted)

    def inner_state(self) -> dict[str, Tensor]:
        named = self.model.named_parameters()
        theta = {n: named[n].detach() for n in self.theta_names}
        state = {}
        for index, branch in enumerate(self.branches):
            start = branch.adapter.init_state(self.model, self.branch_base(branch, theta))
            for key, value in start.items():
                state[f"{index}/{key}"] = torch.zeros_like(value.detach())
        if self.adam:
            residual_keys = list(state)
            for prefix in ADAM_MOMENTS:
                state |= {prefix + key: torch.zeros_like(state[key]) for key in residual_keys}
            state[ADAM_COUNT] = torch.zeros((), device=next(iter(state.values())).device)
        if self.anchor is not None:
            state |= self.anchor.inner_state()
        return state

    # -- one outer step
    def split(self, z: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        theta = {n[len(THETA) :]: v for n, v in z.items() if n.startswith(THETA)}
        residuals: list[dict[str, Tensor]] = [{} for _ in self.branches]
        for key, value in z.items():
            if not key.startswith((THETA, *ADAM_MOMENTS, ADAM_COUNT)):
                index, name = key.split("/", 1)
                residuals[int(index)][name] = value
        return theta, residuals

    def step(self, params: dict[str, Tensor], step: int, generator: torch.Generator):
        context = self.context
        theta = theta_of(params, self.theta_names)
        residuals = {k: v for k, v in inner_of(params).items() if k != ANCHOR_STATES}
        restart = self.config.inner_restart
        if not self.config.inner_warm_start or (restart and step > 0 and step % restart == 0):
            residuals = {k: torch.zeros_like(v) for k, v in residuals.items()}  # moments and count too
        inner_batches = [
            [self.branch_batch(branch, generator) for branch in self.branches]
            for _ in range(self.config.inner_steps)
        ]
        outer_batches = [context.batch(concept, generator, with_prior=False) for concept in context.concepts]

        inner_losses: list[Tensor] = []  # each branch's lower-level loss, detached (read by catch_up only)

        def inner_step(z, batches, *, create_graph):
            theta_now, residual_list = self.split(z)
            updated = dict(z)
            if self.adam:
                count = round(float(z[ADAM_COUNT].detach())) + 1
                updated[ADAM_COUNT] = torch.full_like(z[ADAM_COUNT].detach(), count)
            for index, (branch, batch) in enumerate(zip(self.branches, batches, strict=True)):
                residual = {
                    n: v if v.requires_grad else v.detach().requires_grad_(True)
                    for n, v in residual_list[index].items()
                }
                loss = diffusion_loss(
                    self.model, self.adapted_params(branch, theta_now, residual), batch, generator
                )
                inner_losses.append(loss.detach())
                names = list(residual)
                grads = torch.autograd.grad(
                    loss, [residual[n] for n in names], create_graph=create_graph, allow_unused=True
                )
                if self.adam:  # as torch's Adam, a tensor the loss does not read (no gradient) is left alone
                    used = {n: g for n, g in zip(names, grads, strict=True) if g is not None}
                    keys = {name: f"{index}/{name}" for name in used}
                    moments = tuple({n: z[prefix + keys[n]] for n in used} for prefix in ADAM_MOMENTS)
                    current = {n: residual[n] for n in used}
                    stepped, moments = adam_step(current, used, moments, count, branch.lr)
                    for name in used:
                        updated[keys[name]] = stepped[name]
                        for prefix, moment in zip(ADAM_MOMENTS, moments, strict=True):
                            updated[prefix + keys[name]] = moment[name]
                else:  # r - lr g over every tensor at once (one dispatch per op, not per tensor)
                    used = [(n, g) for n, g in zip(names, grads, strict=True) if g is not None]
                    if used:
                        steps = torch._foreach_mul([g for _, g in used], branch.lr)
                        stepped = torch._foreach_sub([residual[n] for n, _ in used], steps)
                        for (name, _), value in zip(used, stepped, strict=True):
                            updated[f"{index}/{name}"] = value
            return updated

        view_terms: dict[str, list[float]] = {}  # the upper loss's terms, per view

        def upper(z, batches):
            view_terms.clear()
            total = 0.0
            for view, scored, label in self.released_outer_views(z):
                terms = view_terms.setdefault(label, [])
                total = total + self.outer_loss(view, [batches[c] for c in scored], generator, terms)
            return total

        z0 = {THETA + n: v.detach() for n, v in theta.items()} | residuals
        caught_up = self.catch_up(z0, inner_step, inner_losses, generator)
        z0 = caught_up.state
        if self.config.hypergradient == "unrolled":
            result = hypergradient(
                z0,
                mode="unrolled",
                inner_step=inner_step,
                inner_loss=_unused,
                outer_loss=upper,
                inner_batches=inner_batches,
                outer_batch=outer_batches,
                wrt=[THETA + n for n in self.theta_names],
            )
            grads = {n: result.grads[THETA + n] for n in self.theta_names}
            outer_value, adapted_z = result.outer_loss, result.adapted
        else:
            adapted_z = adapt(z0, inner_step, inner_batches, create_graph=False)
            wanted = set(self.theta_names)
            grads = {n: torch.zeros_like(theta[n]) for n in self.theta_names}
            loss = 0.0
            for view, scored, label in self.released_outer_views(adapted_z):
                final = {n: v.detach().requires_grad_(n in wanted) for n, v in view.items()}
                terms = view_terms.setdefault(label, [])
                view_loss = self.outer_loss(final, [outer_batches[c] for c in scored], generator, terms)
                values = torch.autograd.grad(
                    view_loss, [final[n] for n in self.theta_names], allow_unused=True
                )
                for name, value in zip(self.theta_names, values, strict=True):
                    if value is not None:
                        grads[name] = grads[name] + value
                loss = loss + view_loss.detach()
            outer_value = float(loss)
        if self.config.inner_warm_start:  # adapted_z's residual keys are the carried state's own
            store_inner(params, {k: v.detach() for k, v in adapted_z.items() if not k.startswith(THETA)})
        # Gradient *ascent* on the adapted model's loss: the loop minimises, so hand it the negation.
        grads = {n: -g for n, g in grads.items()}
        metrics = target_metrics(view_terms, self.config.max_loss)
        if self.config.inner_catch_up:
            metrics["inner_catch_up"] = caught_up.steps
        loss_value = -outer_value
        if self.config.retain_weight > 0 and context.retain is not None:
            retain_loss = self.retain_loss(theta, generator)
            metrics["retain_loss"] = self.add_term(grads, theta, retain_loss, self.config.retain_weight)
            loss_value += self.config.retain_weight * metrics["retain_loss"]
        if self.anchor is not None:  # drawn after the retain batch: runs without it keep their stream
            self.anchor.refresh(params, step, theta)
            held = self.anchor.loss(theta, self.anchor.batch(generator))
            metrics["anchor_loss"] = self.add_term(grads, theta, held, self.config.anchor_weight)
            loss_value += self.config.anchor_weight * metrics["anchor_loss"]
        return StepOutput(loss=loss_value, grads=grads, metrics=metrics)

    def add_term(
        self, grads: dict[str, Tensor], theta: dict[str, Tensor], loss: Tensor, weight: float
    ) -> float:
        """Adds `weight` times the gradient of a term on the released weights (the retain loss, the anchor)
        to `grads`, in place; returns the term's value."""
        values = torch.autograd.grad(loss, [theta[n] for n in self.theta_names], allow_unused=True)
        for name, grad in zip(self.theta_names, values, strict=True):
            if grad is not None:
                grads[name] = grads[name] + weight * grad
        return loss.item()

    def catch_up(self, z0, inner_step, inner_losses: list[Tensor], generator: torch.Generator) -> CaughtUp:
        """`inner_catch_up`: up to that many extra lower-level steps without a graph (their result a
        constant, as a carried state is), until one starts with every adversary's loss within `max_loss`
        (that step is kept). When the released weights have outrun the adversaries, the ascent (which stops
        past `max_loss`) would stop with them; the extra steps bring them back to a model that still draws
        the target."""
        limit, bound = self.config.inner_catch_up, self.config.max_loss
        state, taken = z0, 0
        while taken < limit:
            batches = [self.branch_batch(branch, generator) for branch in self.branches]
            inner_losses.clear()
            state = adapt(state, inner_step, [batches], create_graph=False)
            taken += 1
            if torch.stack(inner_losses).max().item() <= bound:  # one device sync per extra step
                break
        return CaughtUp(state, taken)

    def branch_batch(self, branch: Branch, generator: torch.Generator) -> Batch:
        """A lower-level batch: from the branch's concepts (pooled), with prior images if enabled."""
        concepts = self.context.concepts
        if len(branch.concepts) == 1:
            return self.context.batch(concepts[branch.concepts[0]], generator)
        choice = torch.randint(0, len(branch.concepts), (1,), generator=generator).item()
        return self.context.batch(concepts[branch.concepts[choice]], generator)

    def retain_loss(self, theta: dict[str, Tensor], generator) -> Tensor:
        if self.config.retain_loss == "rollout":
            start, target, prompts, first = self.context.rollout_draw(generator)
            sampler = self.model.make_sampler("ddim")  # the sampler the trajectories were recorded with
            sampler.set_timesteps(self.config.retain_sampler_steps, device=self.model.device)
            count, scale = self.config.retain_rollout_steps, self.config.retain_guidance_scale
            return rollout_loss(self.model, theta, start, target, prompts, sampler, first, count, scale)
        batch = self.context.batch(self.context.retain_pool, generator, with_prior=False)
        if self.config.retain_unconditional:
            batch = with_null_prompts(self.model, batch, generator)
        if self.config.retain_loss == "diffusion":
            return diffusion_loss(self.model, theta, batch, generator)
        # keep the starting model's predictions, not just the fit (guided: as the sampler combines them)
        return distillation_loss(self.model, theta, batch, generator, self.config.retain_distill_guidance())


def target_metrics(view_terms: dict[str, list[float]], max_loss: float | None) -> dict[str, float]:
    """The upper loss's terms as step metrics: target_loss, their mean over every scored (model, concept)
    pair; with several views, each view's mean (target_loss_<view>); with `max_loss`, target_active, the
    share of terms still at or under it (the ones that push; a term past it has no gradient)."""
    values = [value for terms in view_terms.values() for value in terms]
    metrics = {"target_loss": sum(values) / max(1, len(values))}
    if len(view_terms) > 1:
        metrics |= {f"target_loss_{label}": sum(t) / max(1, len(t)) for label, t in view_terms.items()}
    if max_loss is not None:
        metrics["target_active"] = sum(value <= max_loss for value in values) / max(1, len(values))
    return metrics


def _unused(params, batch):  # the unrolled mode never calls the lower-level loss directly
    raise AssertionError("inner_loss is only used by the implicit hypergradient")
