"""The README's code runs as written: its Python blocks, and its own-space example registers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

import dynas.spaces
import search_spaces
from dynas.spaces import get_space, list_spaces

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_operator_example_runs():
    (block,) = [b for b in _python_blocks() if "DynamicConv2d(" in b]
    scope: dict = {}
    exec(block, scope)
    assert scope["y"].shape == (8, 144, 56, 56)
    assert torch.allclose(scope["pi"].sum(dim=1), torch.ones(8))
    assert scope["conv"].temperature == 15.5


def test_own_space_example_registers_and_searches(registry, tmp_path, monkeypatch):
    (block,) = [b for b in _python_blocks() if "@register_space" in b]
    name = re.search(r"# search_spaces/(\w+)\.py", block).group(1)
    (tmp_path / f"{name}.py").write_text(block)
    monkeypatch.setattr(search_spaces, "__path__", [*search_spaces.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, f"search_spaces.{name}", raising=False)
    dynas.spaces.discover_spaces()
    assert name in list_spaces()
    space = get_space(name)
    assert space.decode({"kernel": 5, "dynamic": True, "num_kernels": 4}).arch.blocks[0].num_kernels == 4
    assert space.smallest().blocks[0].num_kernels == 1
    # The README's contract test class for it runs (its tests called directly, the fixture given).
    (contract,) = [b for b in _python_blocks() if "SearchSpaceContract" in b]
    scope: dict = {}
    exec(contract, scope)
    suite = scope["TestMySpace"]()
    make_space = type(space)
    for test in ("test_choices_are_well_formed", "test_samples_build_train_and_round_trip",
                 "test_suggest_asks_exactly_the_active_choices", "test_the_closed_form_equals_fvcore"):
        getattr(suite, test)(make_space)
    sys.modules.pop(f"search_spaces.{name}")


def test_python_quick_start_runs(tmp_path, monkeypatch):
    (block,) = [b for b in _python_blocks() if "dynas.search(" in b]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block, scope)
    result, model = scope["result"], scope["model"]
    assert result.counters.trained == 4 and 0 <= result.best["val_top1"] <= 100
    assert model.arch.to_str() == result.best["arch"]
