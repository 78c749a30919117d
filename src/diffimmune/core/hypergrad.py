"""Hypergradients of an upper-level loss through a lower-level adaptation (IMMA, MIMA, ResAlign).

Owns the three ways diffimmune differentiates "the loss *after* a fine-tune" w.r.t. the weights before it:

- ``first_order``: adapt without a graph and apply the gradient at the adapted weights to the released
  ones (what the official IMMA / MIMA code does);
- ``unrolled``: keep the graph of all k adaptation steps and backpropagate through them exactly;
- ``implicit``: read the adaptation as the proximal (Moreau envelope) problem
  phi* = argmin_phi inner_loss(phi) + ||phi - theta||^2 / (2 gamma), approximated by the k steps; by the
  implicit function theorem d phi*/d theta = (I + gamma H)^{-1} with H the Hessian of inner_loss at phi*,
  so the hypergradient solves (I + gamma H) x = g, here by Richardson (truncated Neumann) iterations of
  Hessian-vector products (ResAlign).

Second-order passes (the unrolled inner steps, Hessian-vector products) run under
`objective.second_order`: the math attention kernel, the only one with a double backward, and a frozen
convolution whose double backward skips the weight's term; every other pass keeps the fastest kernels.

Everything works on ``params: dict[str, Tensor]``; an inner step is a pure function
``inner_step(params, batch, create_graph=...) -> params``. The solver `richardson_solve` and the
Hessian-vector product `hvp` are public so other methods reuse them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from diffimmune.core.objective import second_order
from diffimmune.errors import DiffImmuneError

__all__ = [
    "HYPERGRADIENT_MODES",
    "HypergradResult",
    "ImplicitConfig",
    "InnerStep",
    "adam_step",
    "adapt",
    "gradient_step",
    "hvp",
    "hypergradient",
    "richardson_solve",
]

logger = logging.getLogger(__name__)

Params = dict[str, Tensor]
Batch = Any
LossFn = Callable[[Params, Batch], Tensor]
HypergradientMode = Literal["first_order", "unrolled", "implicit"]
HYPERGRADIENT_MODES: tuple[str, ...] = ("first_order", "unrolled", "implicit")


class InnerStep(Protocol):
    """One lower-level step ``params -> params``.

    ``create_graph`` says whether the caller will differentiate through the step: a gradient step passes
    it to ``torch.autograd.grad`` so that the unrolled mode sees second-order terms and the cheap modes
    do not pay for them.
    """

    def __call__(self, params: Params, batch: Batch, *, create_graph: bool) -> Params: ...


@dataclass(frozen=True)
class ImplicitConfig:
    """Settings of the implicit hypergradient and of `richardson_solve`.

    gamma: the proximal coefficient of the Moreau envelope (roughly lr * steps of the simulated fine-tune).
    iterations: Richardson iterations K (the Neumann series is truncated there).
    alpha: the Richardson step (damping); it converges when 0 < alpha * (1 + gamma * lambda) < 2 for
        every eigenvalue lambda of H.
    tolerance: stop early once the relative residual ||A x - g|| / ||g|| falls below it.
    max_backoffs: how many times alpha is halved and the solve restarted after a divergence.
    hessian_batches: how many of the last inner batches define H (None: all of them, averaged).
    """

    gamma: float = 0.1
    iterations: int = 10
    alpha: float = 0.5
    tolerance: float = 1e-4
    max_backoffs: int = 3
    hessian_batches: int | None = None

    def __post_init__(self) -> None:
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise DiffImmuneError(f"implicit.gamma must be a positive number, got {self.gamma}")
        if self.iterations < 1:
            raise DiffImmuneError(f"implicit.iterations must be >= 1, got {self.iterations}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise DiffImmuneError(f"implicit.alpha must be a positive number, got {self.alpha}")
        if self.tolerance < 0:
            raise DiffImmuneError(f"implicit.tolerance must be >= 0, got {self.tolerance}")
        if self.max_backoffs < 0:
            raise DiffImmuneError(f"implicit.max_backoffs must be >= 0, got {self.max_backoffs}")
        if self.hessian_batches is not None and self.hessian_batches < 1:
            raise DiffImmuneError(
                f"implicit.hessian_batches must be >= 1 or unset, got {self.hessian_batches}"
            )


@dataclass
class HypergradResult:
    """grads: d outer / d params, keyed like params; outer_loss: at the adapted weights; adapted: the
    adapted weights (detached); info: the mode and, for ``implicit``, the solver's report."""

    grads: Params
    outer_loss: float
    adapted: Params
    info: dict[str, Any] = field(default_factory=dict)


def gradient_step(loss_fn: LossFn, lr: float) -> InnerStep:
    """The plain SGD step phi - lr * grad loss_fn(phi, batch) as an `InnerStep`."""

    def step(params: Params, batch: Batch, *, create_graph: bool) -> Params:
        grads = _grad(loss_fn(params, batch), params, create_graph=create_graph)
        return {name: value - lr * grads[name] for name, value in params.items()}

    return step


def adam_step(
    params: Params,
    grads: Params,
    moments: tuple[Params, Params],
    count: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Params, tuple[Params, Params]]:
    """Adam's `count`-th step (from 1) as a differentiable function: (params', (first', second')).

    As torch.optim.Adam: bias correction applied once, eps added to the root of the corrected second
    moment. A moment missing from `moments` starts at zero. The root is taken of the second moment clamped
    at eps^2. That changes nothing for gradients above ~eps, and it keeps a graph through the step finite
    where a gradient is exactly zero (a fresh LoRA's A): there the plain root's derivative is infinite.
    """
    beta1, beta2 = betas
    correction1, correction2 = 1 - beta1**count, 1 - beta2**count
    first_moments, second_moments, updated = {}, {}, {}
    for name, value in params.items():
        grad = grads[name]
        first = beta1 * moments[0].get(name, 0.0) + (1 - beta1) * grad
        second = beta2 * moments[1].get(name, 0.0) + (1 - beta2) * grad * grad
        denominator = (second / correction2).clamp_min(eps * eps).sqrt() + eps
        updated[name] = value - lr * (first / correction1) / denominator
        first_moments[name], second_moments[name] = first, second
    return updated, (first_moments, second_moments)


def adapt(params: Params, inner_step: InnerStep, batches: Sequence[Batch], create_graph: bool) -> Params:
    """Run ``inner_step`` once per batch. With ``create_graph=False`` every step starts from detached
    leaves and its output is detached, so nothing of the graph survives (cheap, first-order)."""
    current = dict(params)
    for batch in batches:
        if not create_graph:
            current = _fresh_leaves(current)
        current = inner_step(current, batch, create_graph=create_graph)
    if not create_graph:
        current = {name: value.detach() for name, value in current.items()}
    return current


def hvp(loss_fn: Callable[[Params], Tensor], params: Params, vector: Params) -> Params:
    """The Hessian-vector product H v of ``loss_fn`` at ``params`` by double backward.

    H is evaluated at the values of ``params``; the result is not differentiable w.r.t. them.
    """
    if set(vector) != set(params):
        raise DiffImmuneError("hvp: the vector must have the same names as the parameters")
    leaves = _fresh_leaves(params)
    with second_order():  # differentiated twice: the one pass that needs the second-order kernels
        grads = _grad(loss_fn(leaves), leaves, create_graph=True)
        names = [name for name in leaves if grads[name].requires_grad]
        if not names:
            return {name: torch.zeros_like(value) for name, value in leaves.items()}
        products = torch.autograd.grad(
            [grads[name] for name in names],
            [leaves[name] for name in names],
            grad_outputs=[vector[name].to(grads[name]) for name in names],
            allow_unused=True,
        )
    by_name = dict(zip(names, products, strict=True))
    return {
        name: (by_name.get(name) if by_name.get(name) is not None else torch.zeros_like(value)).detach()
        for name, value in leaves.items()
    }


def richardson_solve(
    matvec: Callable[[Params], Params], g: Params, config: ImplicitConfig
) -> tuple[Params, dict[str, Any]]:
    """Solve A x = g by Richardson iterations x <- x + alpha (g - A x), starting at x = g.

    With A = I + gamma H this is the truncated Neumann series of (I + gamma H)^{-1} g. A diverging run
    (relative residual growing or non-finite) is restarted with alpha halved, up to
    ``config.max_backoffs`` times; if every run fails the answer falls back to g itself, which is logged
    at WARNING level and reported as ``info["fallback"] = True``.

    Returns x and info: residual (relative, of the returned x), iterations (of the last run), alpha (of
    the last run), backoffs, converged (residual <= tolerance), fallback.
    """
    g = {name: value.detach() for name, value in g.items()}
    g_norm = _norm(g)
    if g_norm == 0.0:
        info = {"residual": 0.0, "iterations": 0, "alpha": config.alpha, "backoffs": 0}
        return g, {**info, "converged": True, "fallback": False}
    alpha = config.alpha
    for backoff in range(config.max_backoffs + 1):
        x, residual, iterations, diverged = _richardson_run(matvec, g, g_norm, alpha, config)
        if not diverged:
            info = {"residual": residual, "iterations": iterations, "alpha": alpha, "backoffs": backoff}
            return x, {**info, "converged": residual <= config.tolerance, "fallback": False}
        if backoff < config.max_backoffs:
            alpha = alpha / 2
    fallback_residual = _norm(_subtract(g, matvec(g))) / g_norm
    logger.warning(
        "Richardson solve diverged after %d backoffs (alpha=%.3g, residual=%.3g); falling back to the "
        "first-order gradient (residual %.3g). Lower implicit.alpha or implicit.gamma.",
        config.max_backoffs,
        alpha,
        residual,
        fallback_residual,
    )
    info = {"residual": fallback_residual, "iterations": iterations, "alpha": alpha}
    return g, {**info, "backoffs": config.max_backoffs, "converged": False, "fallback": True}


def hypergradient(
    params: Params,
    *,
    mode: HypergradientMode,
    inner_step: InnerStep,
    inner_loss: LossFn,
    outer_loss: LossFn,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
    implicit: ImplicitConfig | None = None,
    wrt: Sequence[str] | None = None,
) -> HypergradResult:
    """d outer_loss(adapt(params)) / d params, computed the way ``mode`` says (see the module docstring).

    ``inner_loss`` is used only by ``implicit`` (its Hessian at the adapted weights). ``wrt`` (unrolled
    mode) names the entries to differentiate w.r.t.; the others start as constants (an inner step must
    then make its own leaves of them), which saves the backward pass into their starting values. The gradients are
    taken w.r.t. the given tensors (they may be leaves, parameters, or outputs of an earlier graph) and
    nothing is accumulated into ``.grad``.
    """
    if mode not in HYPERGRADIENT_MODES:
        raise DiffImmuneError(
            f"unknown hypergradient mode {mode!r}; choose one of {', '.join(HYPERGRADIENT_MODES)}"
        )
    if mode == "unrolled":
        chosen = set(params) if wrt is None else set(wrt)
        sources = {
            name: (value if value.requires_grad else value.detach().requires_grad_(True))
            if name in chosen
            else value.detach()
            for name, value in params.items()
        }
        # The inner steps are differentiated twice and need the second-order kernels; the upper loss
        # only once, so it keeps the fastest ones.
        with second_order():
            adapted = adapt(sources, inner_step, inner_batches, create_graph=True)
        loss = outer_loss(adapted, outer_batch)
        grads = _grad(loss, {n: v for n, v in sources.items() if n in chosen}, create_graph=False)
        detached = {name: value.detach() for name, value in adapted.items()}
        return HypergradResult(grads, loss.item(), detached, {"mode": mode})

    adapted = _fresh_leaves(adapt(params, inner_step, inner_batches, create_graph=False))
    loss = outer_loss(adapted, outer_batch)
    outer_grads = _grad(loss, adapted, create_graph=False)
    detached = {name: value.detach() for name, value in adapted.items()}
    if mode == "first_order":
        return HypergradResult(outer_grads, loss.item(), detached, {"mode": mode})

    config = implicit if implicit is not None else ImplicitConfig()
    if not inner_batches:
        raise DiffImmuneError("implicit hypergradient needs at least one inner batch to define the Hessian")
    hessian_batches = (
        list(inner_batches)[-config.hessian_batches :] if config.hessian_batches else list(inner_batches)
    )

    def lower_objective(values: Params) -> Tensor:
        return sum(inner_loss(values, batch) for batch in hessian_batches) / len(hessian_batches)

    def proximal_operator(vector: Params) -> Params:
        # (I + gamma H) v: the Jacobian of the proximal optimality condition at phi*.
        product = hvp(lower_objective, detached, vector)
        return {name: vector[name] + config.gamma * product[name] for name in vector}

    grads, solver_info = richardson_solve(proximal_operator, outer_grads, config)
    return HypergradResult(grads, loss.item(), detached, {"mode": mode, **solver_info})


def _richardson_run(
    matvec: Callable[[Params], Params], g: Params, g_norm: float, alpha: float, config: ImplicitConfig
) -> tuple[Params, float, int, bool]:
    """One Richardson run at a fixed alpha: (x, relative residual of x, iterations, diverged)."""
    x = dict(g)
    residual_vector = _subtract(g, matvec(x))
    residual = _norm(residual_vector) / g_norm
    iterations = 0
    while iterations < config.iterations and residual > config.tolerance:
        x = {name: x[name] + alpha * residual_vector[name] for name in x}
        iterations += 1
        residual_vector = _subtract(g, matvec(x))
        previous, residual = residual, _norm(residual_vector) / g_norm
        # For a symmetric operator and a stable alpha the residual never grows; a small slack absorbs
        # floating-point noise near convergence.
        if not math.isfinite(residual) or residual > previous * (1 + 1e-3):
            return x, residual, iterations, True
    return x, residual, iterations, False


def _fresh_leaves(params: Params) -> Params:
    return {name: value.detach().requires_grad_(True) for name, value in params.items()}


def _grad(loss: Tensor, params: Params, *, create_graph: bool) -> Params:
    """Gradients keyed like ``params``; parameters the loss does not touch get zeros, not None."""
    if loss.ndim != 0:
        raise DiffImmuneError(f"a loss must be a scalar tensor, got shape {tuple(loss.shape)}")
    names = list(params)
    grads = torch.autograd.grad(
        loss, [params[name] for name in names], create_graph=create_graph, allow_unused=True
    )
    return {
        name: grad if grad is not None else torch.zeros_like(params[name])
        for name, grad in zip(names, grads, strict=True)
    }


def _subtract(a: Params, b: Params) -> Params:
    return {name: a[name] - b[name] for name in a}


def _norm(values: Params) -> float:
    return math.sqrt(sum(float(value.detach().double().pow(2).sum()) for value in values.values()))
