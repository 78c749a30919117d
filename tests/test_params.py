"""Parameter selections pick exactly what their names say."""

from __future__ import annotations

import pytest

from diffimmune.errors import DiffImmuneError
from diffimmune.models.params import SELECTIONS, select_parameters, selection_names, trainable_parameters


def test_xattn_kv_picks_every_cross_attention_key_and_value_and_nothing_of_self_attention(tiny_model):
    names = list(tiny_model.named_parameters())
    expected = {n for n in names if ".attn2.to_k." in n or ".attn2.to_v." in n}
    chosen = set(select_parameters(tiny_model, "xattn_kv"))
    assert chosen == expected
    assert len(chosen) == 8  # four transformer blocks in the tiny UNet, K and V each
    assert not any(".attn1." in n for n in chosen)


def test_matching_is_exact_not_by_substring():
    names = [
        "unet.a.attn2.to_k.weight",
        "unet.a.attn20.to_k.weight",
        "unet.a.attn2.to_k_ip.weight",
        "unet.a.my_attn2.to_v.weight",
        "unet.a.attn2.to_v.weight.extra",
        "text_encoder.x.attn2.to_k.weight",
    ]
    assert selection_names("xattn_kv", names) == ["unet.a.attn2.to_k.weight"]


def test_attn_covers_self_and_cross_attention_projections(tiny_model):
    chosen = set(select_parameters(tiny_model, "attn"))
    assert any(".attn1.to_q." in n for n in chosen)
    assert any(".attn2.to_out.0.bias" in n for n in chosen)
    assert not any("norm" in n or "ff." in n for n in chosen)
    assert set(select_parameters(tiny_model, "xattn")) < chosen


def test_unet_minus_xattn_kv_is_the_complement_within_the_unet(tiny_model):
    unet = set(select_parameters(tiny_model, "unet"))
    kv = set(select_parameters(tiny_model, "xattn_kv"))
    rest = set(select_parameters(tiny_model, "unet_minus_xattn_kv"))
    assert rest == unet - kv and kv <= unet and not rest & kv


def test_text_embeddings_is_the_token_embedding_table(tiny_model):
    chosen = select_parameters(tiny_model, "text_embeddings")
    (tensor,) = chosen.values()
    assert tensor.shape[0] == len(tiny_model.tokenizer)


def test_unknown_selection_names_the_known_ones(tiny_model):
    with pytest.raises(DiffImmuneError) as caught:
        select_parameters(tiny_model, "cross_attention")
    message = str(caught.value)
    assert "cross_attention" in message and all(name in message for name in SELECTIONS)


def test_trainable_parameters_freezes_everything_else(tiny_model):
    chosen = trainable_parameters(tiny_model, "xattn_kv")
    for name, tensor in tiny_model.named_parameters().items():
        assert tensor.requires_grad == (name in chosen)
