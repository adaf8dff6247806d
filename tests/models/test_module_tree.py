"""The stage-tagged module tree on a small hand-made model whose counts are worked out by hand."""

from __future__ import annotations

import torch
from torch import nn

from llm_perf_opt.models.module_tree import module_tree, render, stage_of, stage_totals


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(3))  # held by a non-leaf: 3 own parameters
        self.fc = nn.Linear(4, 5)  # 4·5 + 5 = 25
        self.act = nn.GELU()  # 0


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.newline = nn.Parameter(torch.zeros(1234))  # on the root, tagged by its own prefix
        self.encoder = nn.Sequential(Block(), Block())  # 2 · (3 + 25) = 56
        # A PyTorch layer with a child (out_proj): a leaf, children not listed.
        # in_proj 3·4·4 + 3·4 = 60, out_proj 4·4 + 4 = 20 → 80
        self.attn = nn.MultiheadAttention(4, 1)
        self.head = nn.Linear(4, 2, bias=False)  # 8
        self.out = nn.Linear(4, 2, bias=False)
        self.out.weight = self.head.weight  # tied: counted once, with `head`


PREFIXES = {"encoder": "enc", "encoder.1": "enc1", "newline": "enc", "head": "out", "out": "out"}
TOTAL = 1234 + 56 + 80 + 8  # = 1,378


def nodes_by_name():
    with torch.device("meta"):
        model = Toy()
    return {n.name: n for n in module_tree(model, PREFIXES)}


def test_names_classes_and_leaves_in_preorder():
    with torch.device("meta"):
        nodes = module_tree(Toy(), PREFIXES)
    assert [(n.name, n.cls, n.leaf, n.depth) for n in nodes] == [
        ("", "Toy", False, 0),
        ("encoder", "Sequential", False, 1),
        ("encoder.0", "Block", False, 2),
        ("encoder.0.fc", "Linear", True, 3),
        ("encoder.0.act", "GELU", True, 3),
        ("encoder.1", "Block", False, 2),
        ("encoder.1.fc", "Linear", True, 3),
        ("encoder.1.act", "GELU", True, 3),
        ("attn", "MultiheadAttention", True, 1),
        ("head", "Linear", True, 1),
        ("out", "Linear", True, 1),
    ]


def test_own_and_total_parameters():
    nodes = nodes_by_name()
    own_total = {name: (n.params, n.params_total) for name, n in nodes.items()}
    assert own_total[""] == (1234, TOTAL)
    assert own_total["encoder"] == (0, 56)
    assert own_total["encoder.0"] == (3, 28)
    assert own_total["encoder.0.fc"] == (25, 25)
    assert own_total["encoder.0.act"] == (0, 0)
    assert own_total["attn"] == (80, 80)  # a leaf owns its children's parameters
    assert own_total["head"] == (8, 8)
    assert own_total["out"] == (0, 0)  # its weight is head's


def test_stage_tags_follow_the_longest_prefix():
    nodes = nodes_by_name()
    stages = {name: n.stage for name, n in nodes.items()}
    assert stages[""] is None and stages["attn"] is None
    assert stages["encoder"] == stages["encoder.0"] == stages["encoder.0.fc"] == "enc"
    assert stages["encoder.1"] == stages["encoder.1.fc"] == "enc1"
    assert stages["head"] == stages["out"] == "out"


def test_prefixes_match_whole_name_components():
    prefixes = {"encoder.1": "a", "encoder": "b"}
    assert stage_of("encoder.10.fc", prefixes) == "b"
    assert stage_of("encoder.1", prefixes) == "a"
    assert stage_of("encoders", prefixes) is None
    assert stage_of("anything", {"": "all"}) == "all"


def test_stage_totals_count_each_parameter_once():
    totals = stage_totals(list(nodes_by_name().values()))
    # enc: the root's newline 1234 + encoder.0 (3 + 25); enc1: encoder.1 (3 + 25);
    # untagged: attn 80; out: head 8 (out's tied weight is not counted again).
    assert totals == {"enc": 1234 + 28, "enc1": 28, None: 80, "out": 8}
    assert sum(totals.values()) == TOTAL


def test_render_one_line_per_module_with_separators():
    nodes = list(nodes_by_name().values())
    lines = render(nodes).splitlines()
    assert len(lines) == 11
    root = lines[0].split()
    assert root[:4] == ["(root)", "Toy", "-", "1,378"] and lines[0].endswith("(own 1,234)")
    assert lines[3].split() == ["fc", "Linear", "enc", "25"]
    assert lines[3].startswith("      fc")  # indented two spaces per level
    assert "(own" not in lines[8]  # attn: a leaf's parameters are all its own, nothing to add


def test_render_max_depth():
    nodes = list(nodes_by_name().values())
    names = [line.split()[0] for line in render(nodes, max_depth=1).splitlines()]
    assert names == ["(root)", "encoder", "attn", "head", "out"]
