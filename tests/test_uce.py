"""UCE's closed form: it minimises its objective, moves erased concepts to their guides, keeps preserved ones."""

from __future__ import annotations

import pytest
import torch

from diffimmune.errors import DiffImmuneError
from diffimmune.methods.uce import concept_embeddings, uce_erase, uce_weight


def objective(w_new, w, c_erase, v_erase, c_keep, lamb, erase_scale, preserve_scale):
    erase = erase_scale * (c_erase @ w_new.T - v_erase).pow(2).sum()
    keep = preserve_scale * (c_keep @ w_new.T - c_keep @ w.T).pow(2).sum()
    return erase + keep + lamb * (w_new - w).pow(2).sum()


def test_closed_form_is_the_minimiser_of_the_uce_objective():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    c_erase, v_erase = (
        torch.randn(3, 7, generator=generator, dtype=torch.float64),
        torch.randn(3, 5, generator=generator, dtype=torch.float64),
    )
    c_keep = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    w_new = uce_weight(
        w, c_erase, v_erase, c_keep, lamb=0.3, erase_scale=2.0, preserve_scale=0.7
    ).requires_grad_(True)
    loss = objective(w_new, w, c_erase, v_erase, c_keep, 0.3, 2.0, 0.7)
    (gradient,) = torch.autograd.grad(loss, w_new)
    assert gradient.abs().max() < 1e-10
    perturbed = w_new.detach() + 1e-3 * torch.randn(5, 7, generator=generator, dtype=torch.float64)
    assert objective(perturbed, w, c_erase, v_erase, c_keep, 0.3, 2.0, 0.7) > loss


def test_erased_concepts_map_to_their_guides_and_preserved_ones_stay(tiny_model):
    edited = uce_erase(tiny_model, ["star", "circle"], guide="", preserve=["square", "dog"], lamb=1e-3)
    erase, guide = (
        concept_embeddings(tiny_model, ["star", "circle"]),
        concept_embeddings(tiny_model, ["", ""]),
    )
    keep = concept_embeddings(tiny_model, ["square", "dog"])
    named = tiny_model.named_parameters()
    assert len(edited) == 8
    for name, new in edited.items():
        old = named[name]
        assert torch.allclose(erase @ new.T, guide @ old.T, atol=1e-3)
        assert torch.allclose(keep @ new.T, keep @ old.T, atol=1e-3)
        assert not torch.allclose(new, old)


def test_mismatched_guides_are_a_clear_error(tiny_model):
    with pytest.raises(DiffImmuneError, match="2 concepts to erase but 3 guides"):
        uce_erase(tiny_model, ["star", "circle"], guide=["a", "b", "c"])


def test_cli_erase_writes_a_delta_that_reloads_onto_its_base(tiny_sd_dir, tmp_path):
    from typer.testing import CliRunner

    from diffimmune.cli import app
    from diffimmune.models.diffusion_model import DiffusionModel, read_delta_manifest

    result = CliRunner().invoke(
        app,
        [
            "erase",
            "--model",
            str(tiny_sd_dir),
            "--concepts",
            "star,circle",
            "--preserve",
            "square",
            "--out",
            str(tmp_path / "erased"),
            "--export",
            str(tmp_path / "full"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = read_delta_manifest(tmp_path / "erased")
    assert manifest["method"] == "uce" and len(manifest["changed"]) == 8
    from_delta = DiffusionModel.from_delta(tmp_path / "erased", device="cpu")
    from_folder = DiffusionModel.from_pretrained(tmp_path / "full", device="cpu")
    for name in manifest["changed"]:
        assert torch.equal(from_delta.named_parameters()[name], from_folder.named_parameters()[name])
