"""Hypergradients on quadratics whose answers are known in closed form.

inner_loss(phi) = 0.5 phi^T A phi - b^T phi (A SPD), a gradient step with lr eta, outer_loss = 0.5||phi - c||^2.
The parameters are a dict of a [2, 3] matrix and a [4] vector, flattened into one vector of size 10.
"""

import logging

import pytest
import torch

from diffimmune.core.hypergrad import (
    ImplicitConfig,
    adam_step,
    adapt,
    gradient_step,
    hvp,
    hypergradient,
    richardson_solve,
)
from diffimmune.errors import DiffImmuneError

SHAPES = {"weight": (2, 3), "bias": (4,)}
SIZE = 10
ETA, STEPS, GAMMA = 0.1, 4, 0.5
DTYPE = torch.float64


def _flatten(params):
    return torch.cat([params[name].reshape(-1) for name in SHAPES])


def _unflatten(vector):
    params, start = {}, 0
    for name, shape in SHAPES.items():
        count = torch.Size(shape).numel()
        params[name] = vector[start : start + count].reshape(shape)
        start += count
    return params


def _spd(seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(SIZE, SIZE, generator=generator, dtype=DTYPE)
    return scale * (basis @ basis.T / SIZE + 0.5 * torch.eye(SIZE, dtype=DTYPE))


def _setup(seed=0):
    generator = torch.Generator().manual_seed(seed + 100)
    A = _spd(seed)
    A = A / torch.linalg.eigvalsh(A).max()  # eigenvalues in (0, 1], so eta * A is a contraction
    b, c, theta = (torch.randn(SIZE, generator=generator, dtype=DTYPE) for _ in range(3))

    def inner_loss(params, batch):
        phi = _flatten(params)
        return 0.5 * phi @ A @ phi - b @ phi

    def outer_loss(params, batch):
        return 0.5 * (_flatten(params) - c).square().sum()

    return A, b, c, theta, inner_loss, outer_loss


def _closed_form_adapted(A, b, theta, steps=STEPS):
    phi = theta.clone()
    for _ in range(steps):
        phi = phi - ETA * (A @ phi - b)
    return phi


def test_unrolled_equals_the_closed_form_through_all_steps():
    A, b, c, theta, inner_loss, outer_loss = _setup()
    result = hypergradient(
        _unflatten(theta),
        mode="unrolled",
        inner_step=gradient_step(inner_loss, ETA),
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        inner_batches=[None] * STEPS,
        outer_batch=None,
    )
    phi_k = _closed_form_adapted(A, b, theta)
    jacobian = torch.linalg.matrix_power(torch.eye(SIZE, dtype=DTYPE) - ETA * A, STEPS)
    assert torch.allclose(_flatten(result.grads), jacobian.T @ (phi_k - c), atol=1e-10, rtol=0)
    assert torch.allclose(_flatten(result.adapted), phi_k, atol=1e-12)
    assert result.outer_loss == pytest.approx(0.5 * float((phi_k - c).square().sum()))


def test_first_order_is_the_outer_gradient_at_the_adapted_weights():
    A, b, c, theta, inner_loss, outer_loss = _setup()
    result = hypergradient(
        _unflatten(theta),
        mode="first_order",
        inner_step=gradient_step(inner_loss, ETA),
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        inner_batches=[None] * STEPS,
        outer_batch=None,
    )
    assert set(result.grads) == set(SHAPES)
    assert result.grads["weight"].shape == SHAPES["weight"]
    assert torch.allclose(_flatten(result.grads), _closed_form_adapted(A, b, theta) - c, atol=1e-12)


def test_adapt_without_graph_returns_detached_weights():
    _, _, _, theta, inner_loss, _ = _setup()
    params = {name: value.requires_grad_(True) for name, value in _unflatten(theta.clone()).items()}
    adapted = adapt(params, gradient_step(inner_loss, ETA), [None] * STEPS, create_graph=False)
    assert not any(value.requires_grad for value in adapted.values())


def test_implicit_equals_the_closed_form_of_the_converged_proximal_problem():
    A, b, c, theta, inner_loss, outer_loss = _setup()

    def proximal_loss(params, batch):
        return inner_loss(params, batch) + (_flatten(params) - theta).square().sum() / (2 * GAMMA)

    # Enough steps on the prox objective that phi_k is phi* to machine precision.
    result = hypergradient(
        _unflatten(theta),
        mode="implicit",
        inner_step=gradient_step(proximal_loss, 0.3),
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        inner_batches=[None] * 300,
        outer_batch=None,
        implicit=ImplicitConfig(gamma=GAMMA, iterations=200, alpha=0.6, tolerance=1e-12),
    )
    identity = torch.eye(SIZE, dtype=DTYPE)
    phi_star = torch.linalg.solve(A + identity / GAMMA, b + theta / GAMMA)
    assert torch.allclose(_flatten(result.adapted), phi_star, atol=1e-10)
    expected = torch.linalg.solve(identity + GAMMA * A, phi_star - c)
    assert torch.allclose(_flatten(result.grads), expected, atol=1e-9)
    assert result.info["fallback"] is False
    assert result.info["residual"] <= 1e-12


def _quadratic_matvec(matrix):
    return lambda vector: _unflatten(matrix @ _flatten(vector))


def test_richardson_converges_to_the_direct_solve():
    A = torch.eye(SIZE, dtype=DTYPE) + GAMMA * _spd(1)
    g = _unflatten(torch.randn(SIZE, generator=torch.Generator().manual_seed(3), dtype=DTYPE))
    alpha = 1.0 / torch.linalg.eigvalsh(A).max().item()
    x, info = richardson_solve(
        _quadratic_matvec(A), g, ImplicitConfig(iterations=500, alpha=alpha, tolerance=1e-12)
    )
    assert torch.allclose(_flatten(x), torch.linalg.solve(A, _flatten(g)), atol=1e-10)
    assert info["converged"] and not info["fallback"] and info["backoffs"] == 0


def test_richardson_backs_off_alpha_when_it_diverges():
    A = torch.eye(SIZE, dtype=DTYPE) + GAMMA * _spd(1)
    g = _unflatten(torch.randn(SIZE, generator=torch.Generator().manual_seed(3), dtype=DTYPE))
    stable_alpha = 1.0 / torch.linalg.eigvalsh(A).max().item()
    config = ImplicitConfig(iterations=500, alpha=6 * stable_alpha, tolerance=1e-10, max_backoffs=4)
    x, info = richardson_solve(_quadratic_matvec(A), g, config)
    assert info["backoffs"] >= 1 and info["alpha"] < config.alpha
    assert not info["fallback"]
    assert torch.allclose(_flatten(x), torch.linalg.solve(A, _flatten(g)), atol=1e-8)


def test_richardson_falls_back_to_g_loudly_when_it_keeps_diverging(caplog):
    A = torch.eye(SIZE, dtype=DTYPE) + GAMMA * _spd(1)
    g = _unflatten(torch.randn(SIZE, generator=torch.Generator().manual_seed(3), dtype=DTYPE))
    config = ImplicitConfig(iterations=50, alpha=1e6, max_backoffs=0)
    with caplog.at_level(logging.WARNING, logger="diffimmune.core.hypergrad"):
        x, info = richardson_solve(_quadratic_matvec(A), g, config)
    assert info["fallback"] is True
    assert {"residual", "iterations", "alpha"} <= set(info)
    assert all(torch.equal(x[name], g[name]) for name in g)
    assert any(
        record.levelno == logging.WARNING and "falling back" in record.message for record in caplog.records
    )


def test_implicit_hypergradient_reports_the_fallback_in_info(caplog):
    _, _, _, theta, inner_loss, outer_loss = _setup()
    with caplog.at_level(logging.WARNING, logger="diffimmune.core.hypergrad"):
        result = hypergradient(
            _unflatten(theta),
            mode="implicit",
            inner_step=gradient_step(inner_loss, ETA),
            inner_loss=inner_loss,
            outer_loss=outer_loss,
            inner_batches=[None] * STEPS,
            outer_batch=None,
            implicit=ImplicitConfig(gamma=GAMMA, iterations=20, alpha=1e6, max_backoffs=0),
        )
    first_order = _flatten(result.adapted) - _setup()[2]
    assert result.info["fallback"] is True
    assert torch.allclose(_flatten(result.grads), first_order)
    assert "falling back" in caplog.text


def test_hvp_matches_the_hessian_times_the_vector():
    A, _, _, theta, inner_loss, _ = _setup()
    vector = torch.randn(SIZE, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    product = hvp(lambda params: inner_loss(params, None), _unflatten(theta), _unflatten(vector))
    assert set(product) == set(SHAPES)
    assert torch.allclose(_flatten(product), A @ vector, atol=1e-12)


def _adam_lora_problem():
    """theta + B A v fitted to t by Adam steps on (A, B), B starting at zero (a fresh LoRA): A's first
    gradient is exactly zero. The moments and the step count ride in the params dict."""
    generator = torch.Generator().manual_seed(7)
    v, t, c, theta = (torch.randn(3, generator=generator, dtype=DTYPE) for _ in range(4))
    start = {
        "A": torch.randn(2, 3, generator=generator, dtype=DTYPE),
        "B": torch.zeros(3, 2, dtype=DTYPE),
    }

    def fit(params, target):
        return (params["theta"] + params["B"] @ params["A"] @ v - target).square().sum()

    def inner_step(params, batch, *, create_graph):
        count = round(float(params["count"].detach())) + 1
        names = ["A", "B"]
        # Constants (the unrolled mode's non-wrt entries) become leaves, as an inner step must make them.
        params = {
            n: v if n not in names or v.requires_grad else v.requires_grad_(True) for n, v in params.items()
        }
        grads = torch.autograd.grad(fit(params, t), [params[n] for n in names], create_graph=create_graph)
        moments = tuple({n: params[f"{m}:{n}"] for n in names} for m in ("first", "second"))
        stepped, (first, second) = adam_step(
            {n: params[n] for n in names}, dict(zip(names, grads, strict=True)), moments, count, 0.05
        )
        moved = {f"first:{n}": first[n] for n in names} | {f"second:{n}": second[n] for n in names}
        return {**params, **stepped, **moved, "count": torch.tensor(float(count), dtype=DTYPE)}

    zeros = {f"{m}:{n}": torch.zeros_like(value) for m in ("first", "second") for n, value in start.items()}
    params = {"theta": theta, **start, **zeros, "count": torch.tensor(0.0, dtype=DTYPE)}
    return params, inner_step, (lambda adapted, batch: fit(adapted, c))


def test_unrolled_through_adam_steps_matches_finite_differences_from_a_zero_gradient():
    params, inner_step, outer_loss = _adam_lora_problem()
    result = hypergradient(
        params,
        mode="unrolled",
        inner_step=inner_step,
        inner_loss=None,
        outer_loss=outer_loss,
        inner_batches=[None] * 3,
        outer_batch=None,
        wrt=["theta"],
    )
    analytic = result.grads["theta"]
    assert torch.isfinite(analytic).all()  # the zero gradient's root is clamped, not differentiated at 0

    def objective(theta):
        adapted = adapt({**params, "theta": theta}, inner_step, [None] * 3, create_graph=False)
        return outer_loss(adapted, None).item()

    epsilon = 1e-6
    numeric = torch.stack(
        [
            torch.tensor(
                (objective(params["theta"] + epsilon * e) - objective(params["theta"] - epsilon * e))
                / (2 * epsilon)
            )
            for e in torch.eye(3, dtype=DTYPE)
        ]
    ).to(DTYPE)
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-8), (analytic, numeric)
    # A's first gradient was zero; its later steps (once B had left zero) moved it.
    assert not torch.equal(result.adapted["A"], params["A"])


def test_unknown_mode_is_a_user_error():
    _, _, _, theta, inner_loss, outer_loss = _setup()
    with pytest.raises(DiffImmuneError, match="unknown hypergradient mode"):
        hypergradient(
            _unflatten(theta),
            mode="second_order",
            inner_step=gradient_step(inner_loss, ETA),
            inner_loss=inner_loss,
            outer_loss=outer_loss,
            inner_batches=[None],
            outer_batch=None,
        )


def test_invalid_implicit_config_is_a_user_error():
    with pytest.raises(DiffImmuneError, match="alpha"):
        ImplicitConfig(alpha=0.0)
