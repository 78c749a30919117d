"""The K/V merge: Custom Diffusion's constrained least squares, and MIMA's Merge of adapted models."""

import pytest
import torch

from diffimmune.core.merge import merge_models, merge_projection, regularisation_gram
from diffimmune.errors import DiffImmuneError

OUT, IN, CONCEPT_TOKENS, REG_TOKENS = 6, 8, 3, 20


def _problem(dtype=torch.float64, reg_tokens=REG_TOKENS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    W0 = torch.randn(OUT, IN, generator=generator, dtype=dtype)
    C = torch.randn(CONCEPT_TOKENS, IN, generator=generator, dtype=dtype)
    V = torch.randn(CONCEPT_TOKENS, OUT, generator=generator, dtype=dtype)
    C_reg = torch.randn(reg_tokens, IN, generator=generator, dtype=dtype)
    return W0, C, V, C_reg


def _kkt_solution(W0, C, V, gram):
    """Solve min tr(D^T M D) s.t. C D = V - C W0^T through the explicit KKT system [[2M, C^T], [C, 0]]."""
    n = C.shape[0]
    kkt = torch.zeros(IN + n, IN + n, dtype=W0.dtype)
    kkt[:IN, :IN] = 2 * gram
    kkt[:IN, IN:] = C.T
    kkt[IN:, :IN] = C
    rhs = torch.cat([torch.zeros(IN, OUT, dtype=W0.dtype), V - C @ W0.T])
    delta_t = torch.linalg.solve(kkt, rhs)[:IN]
    return W0 + delta_t.T


def test_constraint_holds_in_float64():
    W0, C, V, C_reg = _problem()
    W = merge_projection(W0, C, V, C_reg)
    assert torch.allclose(C @ W.T, V, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reg_tokens", [3, REG_TOKENS])
def test_constraint_holds_in_float32_also_with_fewer_reg_tokens_than_features(reg_tokens):
    W0, C, V, C_reg = _problem(torch.float32, reg_tokens=reg_tokens)
    W = merge_projection(W0, C, V, C_reg)
    assert W.dtype == torch.float32
    assert torch.allclose(C @ W.T, V, atol=1e-4, rtol=0)


def test_equals_the_solution_of_the_explicit_kkt_system_without_ridge():
    W0, C, V, C_reg = _problem()
    W = merge_projection(W0, C, V, C_reg, ridge=0.0)
    assert torch.allclose(W, _kkt_solution(W0, C, V, C_reg.T @ C_reg), atol=1e-10)


def test_equals_the_kkt_solution_of_the_ridged_problem_when_underdetermined():
    W0, C, V, C_reg = _problem(reg_tokens=4)
    W = merge_projection(W0, C, V, C_reg, ridge=1e-3)
    gram = C_reg.T @ C_reg
    ridged = gram + 1e-3 * torch.trace(gram) / IN * torch.eye(IN, dtype=gram.dtype)
    assert torch.allclose(regularisation_gram(C_reg, 1e-3), ridged)
    assert torch.allclose(W, _kkt_solution(W0, C, V, ridged), atol=1e-9)


def test_does_not_modify_its_inputs():
    inputs = _problem()
    copies = [tensor.clone() for tensor in inputs]
    merge_projection(*inputs)
    assert all(torch.equal(tensor, copy) for tensor, copy in zip(inputs, copies, strict=True))


def test_gradient_matches_finite_differences_wrt_targets_weights_and_embeddings():
    W0, C, V, C_reg = (tensor.requires_grad_(True) for tensor in _problem(reg_tokens=10))
    assert torch.autograd.gradcheck(
        lambda W0, C, V: merge_projection(W0, C, V, C_reg).sin().sum(), (W0, C, V), eps=1e-6, atol=1e-5
    )


def _models(dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)

    def params():
        return {
            "attn2.to_k.weight": torch.randn(OUT, IN, generator=generator, dtype=dtype),
            "attn2.to_v.weight": torch.randn(OUT + 2, IN, generator=generator, dtype=dtype),
            "attn2.to_out.weight": torch.randn(OUT, OUT, generator=generator, dtype=dtype),
            "norm.bias": torch.randn(OUT, generator=generator, dtype=dtype),
        }

    base, adapted = params(), [params() for _ in range(3)]
    concepts = [torch.randn(2, IN, generator=generator, dtype=dtype) for _ in adapted]
    reg = torch.randn(REG_TOKENS, IN, generator=generator, dtype=dtype)
    return base, adapted, concepts, reg, {"attn2.to_k.weight", "attn2.to_v.weight"}


def test_merge_models_averages_every_non_kv_tensor_exactly():
    base, adapted, concepts, reg, kv = _models()
    merged = merge_models(base, adapted, concepts, reg, kv)
    assert set(merged) == set(adapted[0])
    for name in ("attn2.to_out.weight", "norm.bias"):
        assert torch.equal(merged[name], sum(params[name] for params in adapted) / 3)


def test_merge_models_sum_adds_every_adapters_change_at_full_strength():
    base, adapted, concepts, reg, kv = _models()
    summed = merge_models(base, adapted, concepts, reg, kv, others="sum")
    averaged = merge_models(base, adapted, concepts, reg, kv)
    for name in ("attn2.to_out.weight", "norm.bias"):
        changes = sum(params[name] - base[name] for params in adapted)
        assert torch.allclose(summed[name], base[name] + changes, atol=1e-12)
        assert not torch.allclose(summed[name], averaged[name])
    for name in kv:  # the closed form is the same either way
        assert torch.equal(summed[name], averaged[name])
    # One adapted model: the sum and the average are that model.
    single = merge_models(base, adapted[:1], concepts[:1], reg, kv, others="sum")
    assert torch.allclose(single["norm.bias"], adapted[0]["norm.bias"], atol=1e-12)
    alone = merge_models(base, adapted[:1], concepts[:1], reg, kv)
    assert all(torch.equal(alone[n], adapted[0][n]) for n in ("attn2.to_out.weight", "norm.bias"))
    with pytest.raises(DiffImmuneError, match="needs the base value of 'attn2.to_out.weight'"):
        merge_models({n: base[n] for n in kv}, adapted, concepts, reg, kv, others="sum")


def test_merge_models_keeps_every_concepts_kv_outputs():
    base, adapted, concepts, reg, kv = _models()
    merged = merge_models(base, adapted, concepts, reg, kv)
    for name in kv:
        for embeddings, params in zip(concepts, adapted, strict=True):
            assert torch.allclose(embeddings @ merged[name].T, embeddings @ params[name].T, atol=1e-5)


def test_merge_models_is_differentiable_wrt_the_adapted_weights():
    base, adapted, concepts, reg, kv = _models()
    for params in adapted:
        for value in params.values():
            value.requires_grad_(True)
    merged = merge_models(base, adapted, concepts, reg, kv)
    grads = torch.autograd.grad(
        sum(value.square().sum() for value in merged.values()), list(adapted[1].values())
    )
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads)


def test_merge_models_rejects_a_kv_name_missing_from_the_parameters():
    base, adapted, concepts, reg, _ = _models()
    with pytest.raises(DiffImmuneError, match="missing"):
        merge_models(base, adapted, concepts, reg, {"attn2.to_q.weight"})


def test_merge_models_rejects_mismatched_concept_count():
    base, adapted, concepts, reg, kv = _models()
    with pytest.raises(DiffImmuneError, match="one embedding tensor per adapted model"):
        merge_models(base, adapted, concepts[:2], reg, kv)


def test_rejects_more_constraints_than_input_features():
    W0, _, _, C_reg = _problem()
    with pytest.raises(DiffImmuneError, match="over-determined"):
        merge_projection(W0, torch.randn(IN + 1, IN, dtype=W0.dtype), torch.randn(IN + 1, OUT), C_reg)


def test_a_precomputed_operator_gives_the_same_merge_and_gradient():
    from diffimmune.core.merge import projection_operator

    base, adapted, concepts, reg, kv = _models()
    for params in adapted:
        for value in params.values():
            value.requires_grad_(True)
    operator = projection_operator(torch.cat(concepts), reg)
    once = merge_models(base, adapted, concepts, reg, kv, operator=operator)
    fresh = merge_models(base, adapted, concepts, reg, kv)
    for name in fresh:
        assert torch.allclose(once[name], fresh[name], atol=1e-10)
    loss_once = sum(v.square().sum() for v in once.values())
    loss_fresh = sum(v.square().sum() for v in fresh.values())
    for a, b in zip(
        torch.autograd.grad(loss_once, list(adapted[0].values())),
        torch.autograd.grad(loss_fresh, list(adapted[0].values())),
        strict=True,
    ):
        assert torch.allclose(a, b, atol=1e-10)
