"""Parity with mergekit for parameters that vary by tensor: gradients over the layers and filters.

Each case writes one mergekit YAML config over tiny 4-layer Llama checkpoints (float32, so
positions ``t = 0, 1/3, 2/3, 1`` fall between the points of a 2- or 3-point gradient), runs
mergekit through its Python API and us through ``merge_from_config`` on the same file, and
compares every tensor. Our parameter values are checked to vary (the merge differs from the
one with the gradient's first value everywhere), so a schedule silently read as a constant fails.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import perturbed, tiny_llama_config
from hf_taskarith import merge_from_config
from tests.mergekit_runs import assert_close_to
from tests.mergekit_runs import state_dict as _sd

with warnings.catch_warnings():  # mergekit's lazy unpickler touches the deprecated numpy.core
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

pytestmark = pytest.mark.mergekit
MK_OPTIONS = MergeOptions(copy_tokenizer=False, lazy_unpickle=True, quiet=True, write_model_card=False)
N_LAYERS = 4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """``<root>/{base,ft1,ft2,ft3}``: tiny float32 Llamas with 4 layers."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("mergekit_gradients")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=N_LAYERS)).eval()
    base.save_pretrained(root / "base")
    for i, seed in enumerate((1, 2, 3)):
        copy.deepcopy(perturbed(base, seed)).save_pretrained(root / f"ft{i + 1}")
    return root


def _yaml(root: Path, method: str, model_params: list[dict], *, shared: dict | None = None,
          with_base: bool = True) -> str:
    cfg: dict = {"merge_method": method}
    if with_base:
        cfg["base_model"] = str(root / "base")
    cfg["models"] = [{"model": str(root / f"ft{i + 1}"), **({"parameters": p} if p else {})}
                     for i, p in enumerate(model_params)]
    if shared:
        cfg["parameters"] = shared
    cfg["dtype"] = "float32"
    return yaml.safe_dump(cfg, sort_keys=False)


def _ours(text: str, tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    cfg_file = tmp_path / f"{name}.yml"
    cfg_file.write_text(text)
    return _sd(merge_from_config(cfg_file, tmp_path / name, progress=False))


def _mergekit(text: str, out: Path) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), options=MK_OPTIONS)
    return _sd(out)


SELF_ATTN_T = [0.0, 0.5, 0.3, 0.7, 1.0]  # mergekit's README slerp example
MLP_T = [1.0, 0.5, 0.7, 0.3, 0.0]
# id, method, per-model parameters, shared parameters, same without the schedule (must differ)
CASES = [
    pytest.param("slerp", [{}], {"t": [0.0, 0.5, 1.0]}, {"t": 0.0}, id="slerp-t_gradient"),
    pytest.param("slerp", [{}], {"t": [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": 0.8},
                                      {"value": 0.5}]}, {"t": 0.2}, id="slerp-filters"),
    pytest.param("slerp", [{}], {"t": [{"filter": "self_attn", "value": SELF_ATTN_T},
                                      {"filter": "mlp", "value": MLP_T}, {"value": 0.5}]}, {"t": 0.0},
                 id="slerp-filters_holding_gradients"),
    pytest.param("task_arithmetic", [{"weight": [0.2, 0.8]}, {"weight": [1.0, -0.5, 0.3]}, {"weight": 0.4}], None,
                 [{"weight": 0.2}, {"weight": 1.0}, {"weight": 0.4}], id="task_arithmetic-per_model_weight_gradients"),
    pytest.param("task_arithmetic", [{}, {}], {"weight": [0.1, 0.9], "lambda": [1.0, 0.5]}, {"weight": 0.1},
                 id="task_arithmetic-shared_weight_and_lambda_gradients"),
    pytest.param("task_arithmetic", [{"weight": {"filter": "mlp", "value": 0.9}}, {"weight": 0.5}],
                 {"weight": 0.3}, [{"weight": 0.3}, {"weight": 0.5}],
                 id="task_arithmetic-model_filter_falls_back_to_shared"),
    pytest.param("ties", [{"weight": 0.5, "density": [0.2, 0.9]}, {"weight": 0.7, "density": [0.9, 0.3, 0.6]}], None,
                 [{"weight": 0.5, "density": 0.2}, {"weight": 0.7, "density": 0.9}], id="ties-density_gradients"),
    pytest.param("ties", [{"weight": [{"filter": "self_attn", "value": [0.2, 1.0]}, {"value": 0.6}], "density": 0.5},
                          {"weight": 0.4, "density": [{"filter": "mlp", "value": 0.3}, {"value": [0.9, 0.5]}]}],
                 {"normalize": False},
                 [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.9}], id="ties-filters_with_gradients"),
    pytest.param("linear", [{"weight": [0.2, 0.8]}, {"weight": [{"filter": "self_attn", "value": 0.6},
                                                              {"value": [1.0, 0.1]}]}], None,
                 [{"weight": 0.2}, {"weight": 1.0}], id="linear-weight_gradients_and_filters"),
]


@pytest.mark.parametrize("method, params, shared, constant", CASES)
def test_schedules_equal_mergekit(method, params, shared, constant, ckpts, tmp_path):
    with_base = method != "linear"
    text = _yaml(ckpts, method, params, shared=shared, with_base=with_base)
    ours, theirs = _ours(text, tmp_path, "ours"), _mergekit(text, tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for k in ours:
        if method == "slerp":  # block by block from Gram matrices: a few float32 ulps (merging/span.py)
            assert_close_to({k: ours[k]}, {k: theirs[k]})
        else:
            torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # the schedule did something: the merge with one value everywhere is different
    if isinstance(constant, list):
        flat = _yaml(ckpts, method, constant, shared=shared, with_base=with_base)
    else:
        flat = _yaml(ckpts, method, params, shared={**(shared or {}), **constant}, with_base=with_base)
    plain = _ours(flat, tmp_path, "constant")
    assert any(not torch.equal(ours[k], plain[k]) for k in ours)


def test_layer_positions_are_mergekits(ckpts, tmp_path):
    """``t`` per tensor: the slerp of a gradient ``[0, 1]`` puts layer i at i / 3 and every tensor
    outside the layers (embeddings, final norm, LM head) at 0, i.e. the base."""
    text = _yaml(ckpts, "slerp", [{}], shared={"t": [0.0, 1.0]})
    ours = _ours(text, tmp_path, "ours")
    base, ft = _sd(ckpts / "base"), _sd(ckpts / "ft1")
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(ours[k], base[k]), k
    for k in ("model.layers.3.mlp.up_proj.weight", "model.layers.3.self_attn.o_proj.weight"):
        assert torch.equal(ours[k], ft[k]), k
    for k in ("model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight"):
        assert not torch.equal(ours[k], base[k]) and not torch.equal(ours[k], ft[k]), k
