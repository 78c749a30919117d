"""Capturing activations by module-name pattern, and never leaving a hook behind."""

import pytest
import torch
from torch import nn

from diffimmune.core.hooks import capture_activations, match_module_names
from diffimmune.errors import DiffImmuneError


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, x):
        hidden = self.act(self.conv(x))
        return hidden, hidden.sum()  # a tuple output, as many diffusers blocks return


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.ModuleDict({"resnets": nn.ModuleList([Block(4), Block(4)])})])
        self.mid_block = nn.Linear(4, 6)
        self.up_blocks = nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 2))

    def forward(self, x):
        for resnet in self.down_blocks[0]["resnets"]:
            x, _ = resnet(x)
        return self.up_blocks(self.mid_block(x))


def _assert_no_hooks(module):
    for name, submodule in module.named_modules():
        assert not submodule._forward_hooks, f"hook left on {name!r}"


def test_captures_the_matching_modules_with_their_output_shapes():
    net = Net()
    with capture_activations(net, ["down_blocks.*.resnets.*", "mid_block", "up_blocks.1"]) as captured:
        net(torch.randn(5, 4))
    assert {name: tuple(value.shape) for name, value in captured.items()} == {
        "down_blocks.0.resnets.0": (5, 4),
        "down_blocks.0.resnets.1": (5, 4),
        "mid_block": (5, 6),
        "up_blocks.1": (5, 2),
    }


def test_single_star_stays_in_one_segment_and_double_star_crosses_them():
    net = Net()
    assert match_module_names(net, ["down_blocks.*.resnets.*"]) == [
        "down_blocks.0.resnets.0",
        "down_blocks.0.resnets.1",
    ]
    assert "down_blocks.0.resnets.1.conv" in match_module_names(net, ["down_blocks.**.conv"])


def test_tuple_outputs_keep_their_first_tensor_with_its_graph():
    net = Net()
    with capture_activations(net, ["down_blocks.0.resnets.0"]) as captured:
        net(torch.randn(2, 4))
    activation = captured["down_blocks.0.resnets.0"]
    assert activation.shape == (2, 4) and activation.requires_grad


def test_works_under_functional_call():
    net = Net()
    params = {name: torch.zeros_like(value) for name, value in net.named_parameters()}
    with capture_activations(net, ["mid_block"]) as captured:
        torch.func.functional_call(net, params, (torch.randn(3, 4),))
    assert torch.equal(captured["mid_block"], torch.zeros(3, 6))


def test_removes_every_hook_on_normal_exit():
    net = Net()
    with capture_activations(net, ["**"]):
        net(torch.randn(1, 4))
    _assert_no_hooks(net)


def test_removes_every_hook_after_an_exception_in_the_block():
    net = Net()
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture_activations(net, ["down_blocks.*.resnets.*", "mid_block"]),
    ):
        net(torch.randn(1, 4))
        raise RuntimeError("boom")
    _assert_no_hooks(net)


def test_a_pattern_matching_nothing_is_a_user_error_naming_available_modules():
    net = Net()
    with pytest.raises(DiffImmuneError, match="mid_blocks.*available names include.*mid_block"):
        with capture_activations(net, ["mid_block", "mid_blocks"]):
            pass
    _assert_no_hooks(net)
