"""The ``hierarchical`` merge: attention heads aligned to the base, then cosine-weighted interpolation.

A head-permuted copy of a model computes the same function; aligning it to the model must find
the permutation back exactly (grouped-query attention included), so merging it with the model
gives the model. The cosine weights are checked on hand-computed cases, and the merge end to end
through YAML on the session's tiny Llamas (4 query heads, 2 key/value heads).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_taskarith import merge, merge_from_config
from hf_taskarith.errors import MergeConfigError
from hf_taskarith.merging.alignment import head_scores, match_heads
from hf_taskarith.merging.methods.hierarchical import cosine_lerp, cosine_weights


# -- helpers (independent of the library's index code) --------------------------------------
def rows_of(perm: torch.Tensor, d: int) -> torch.Tensor:
    """The rows that head permutation ``perm`` (place a <- head perm[a]) takes, each head ``d`` rows."""
    return torch.cat([torch.arange(int(h) * d, (int(h) + 1) * d) for h in perm])


def random_head_perm(heads: int, kv_heads: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random function-preserving permutation: whole key/value groups moved, query heads shuffled inside."""
    group = heads // kv_heads
    kv = torch.randperm(kv_heads, generator=gen)
    query = torch.cat([int(kv[g]) * group + torch.randperm(group, generator=gen) for g in range(kv_heads)])
    return query, kv


def permute_heads(model: torch.nn.Module, perms: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.nn.Module:
    """A copy of a Llama model whose layer ``l`` holds at query place ``a`` the head ``perms[l][0][a]``."""
    out = copy.deepcopy(model)
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer, (query, kv) in perms.items():
            attn = out.model.layers[layer].self_attn
            q_rows, kv_rows = rows_of(query, d), rows_of(kv, d)
            attn.q_proj.weight.copy_(attn.q_proj.weight[q_rows])
            attn.k_proj.weight.copy_(attn.k_proj.weight[kv_rows])
            attn.v_proj.weight.copy_(attn.v_proj.weight[kv_rows])
            attn.o_proj.weight.copy_(attn.o_proj.weight[:, q_rows])
    return out


def layer_scores(ref: dict[str, torch.Tensor], model: dict[str, torch.Tensor], *, heads: int, kv_heads: int):
    query = (head_scores(ref["q"], model["q"], heads=heads, dim=0)
             + head_scores(ref["o"], model["o"], heads=heads, dim=1))
    kv = (head_scores(ref["k"], model["k"], heads=kv_heads, dim=0)
          + head_scores(ref["v"], model["v"], heads=kv_heads, dim=0))
    return query, kv


def random_layer(heads: int, kv_heads: int, d: int, hidden: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"q": torch.randn(heads * d, hidden, generator=gen), "k": torch.randn(kv_heads * d, hidden, generator=gen),
            "v": torch.randn(kv_heads * d, hidden, generator=gen), "o": torch.randn(hidden, heads * d, generator=gen)}


def permute_layer(layer: dict[str, torch.Tensor], query: torch.Tensor, kv: torch.Tensor, d: int):
    q_rows, kv_rows = rows_of(query, d), rows_of(kv, d)
    return {"q": layer["q"][q_rows], "k": layer["k"][kv_rows], "v": layer["v"][kv_rows], "o": layer["o"][:, q_rows]}


# -- alignment maths -------------------------------------------------------------------------
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (8, 8), (6, 1), (4, 2)])
def test_recovers_a_random_head_permutation_exactly(heads, kv_heads):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    d, hidden = 16, 128
    ref = random_layer(heads, kv_heads, d, hidden, gen)
    query, kv = random_head_perm(heads, kv_heads, gen)
    assert not torch.equal(query, torch.arange(heads))
    permuted = permute_layer(ref, query, kv, d)
    permuted = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in permuted.items()}  # and fine-tuned
    got_query, got_kv = match_heads(*layer_scores(ref, permuted, heads=heads, kv_heads=kv_heads))
    # place a of the reference gets the permuted model's head that holds reference head a
    assert torch.equal(got_query, torch.argsort(query))
    assert torch.equal(got_kv, torch.argsort(kv))
    realigned = permute_layer(permuted, got_query, got_kv, d)
    for name in "qkvo":
        assert torch.allclose(realigned[name], ref[name], atol=0.3)


def test_gqa_matching_keeps_query_heads_with_their_key_value_head():
    """Scores that favour a query head of another group are overruled: the permutation stays function-preserving."""
    heads, kv_heads, group = 8, 2, 4
    gen = torch.Generator().manual_seed(0)
    query_scores = torch.randn(heads, heads, generator=gen, dtype=torch.float64)
    kv_scores = torch.tensor([[0.0, 50.0], [50.0, 0.0]], dtype=torch.float64)  # groups swap
    query_scores[0, 0] = 30.0  # tempting, but query head 0 reads key/value head 0
    query_perm, kv_perm = match_heads(query_scores, kv_scores)
    assert kv_perm.tolist() == [1, 0] and len(kv_perm) == kv_heads
    assert (query_perm // group).tolist() == [int(kv_perm[a // group]) for a in range(heads)]
    assert sorted(query_perm.tolist()) == list(range(heads))


def test_head_scores_of_o_proj_sum_over_rows_and_head_columns():
    ref = torch.arange(8.0).reshape(2, 4)      # 2 rows, 2 heads of 2 columns
    model = torch.ones(2, 4)
    scores = head_scores(ref, model, heads=2, dim=1)
    assert scores.tolist() == [[0 + 1 + 4 + 5] * 2, [2 + 3 + 6 + 7] * 2]
    with pytest.raises(ValueError, match="does not split"):
        head_scores(ref, model, heads=3, dim=1)


# -- cosine-weighted interpolation -----------------------------------------------------------
def test_cosine_weights_hand_computed():
    # consensus (1, 0.5): cos = 1 / sqrt(1.25) = 0.894427, 1.5 / sqrt(2.5) = 0.948683
    a = cosine_weights([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])], [1.0, 1.0])
    c1, c2 = 1 / math.sqrt(1.25), 1.5 / math.sqrt(2.5)
    assert a == pytest.approx([c1 / (c1 + c2), c2 / (c1 + c2)], abs=1e-7)
    # priors 3:1, orthogonal task vectors: consensus (0.75, 0.25), a = (0.75 * 0.75, 0.25 * 0.25) normalized
    assert cosine_weights([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [3.0, 1.0]) == pytest.approx([0.9, 0.1])
    # a model against the consensus gets nothing
    assert cosine_weights([torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 0.0])], [1.0, 1.0]) == pytest.approx([0, 1])
    # all task vectors zero: the priors
    assert cosine_weights([torch.zeros(3), torch.zeros(3)], [1.0, 3.0]) == pytest.approx([0.25, 0.75])
    assert cosine_weights([torch.tensor([2.0, -1.0])], [5.0]) == pytest.approx([1.0])


def test_cosine_lerp_is_the_weighted_interpolation():
    base = torch.tensor([1.0, 1.0])
    merged = cosine_lerp([torch.tensor([2.0, 1.0]), torch.tensor([2.0, 2.0])], base=base, prior=[1.0, 1.0])
    c1, c2 = 1 / math.sqrt(1.25), 1.5 / math.sqrt(2.5)
    a1, a2 = c1 / (c1 + c2), c2 / (c1 + c2)
    assert torch.allclose(merged, torch.tensor([1 + a1 + a2, 1 + a2]), atol=1e-6)


# -- end to end -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def permuted_ckpts(tmp_path_factory, llama_models):
    """base, ft1 and head-permuted copies of both (every layer, random GQA permutations)."""
    root = tmp_path_factory.mktemp("hierarchical")
    base, fts = llama_models
    cfg = base.config
    gen = torch.Generator().manual_seed(7)
    perms = {layer: random_head_perm(cfg.num_attention_heads, cfg.num_key_value_heads, gen)
             for layer in range(cfg.num_hidden_layers)}
    base.save_pretrained(root / "base")
    fts[0].save_pretrained(root / "ft1")
    permute_heads(base, perms).save_pretrained(root / "base_permuted")
    permute_heads(fts[0], perms).save_pretrained(root / "ft1_permuted")
    return root, perms


def _tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_permuted_copy_computes_the_same_function(llama_models, permuted_ckpts):
    """The test's permutation is function-preserving (so recovering it is the right target)."""
    from transformers import LlamaForCausalLM

    root, _ = permuted_ckpts
    base = llama_models[0]
    ids = torch.randint(0, base.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    permuted = LlamaForCausalLM.from_pretrained(root / "base_permuted").eval()
    with torch.no_grad():
        assert torch.allclose(permuted(ids).logits, base(ids).logits, atol=1e-5)
    assert not torch.equal(_tensors(root / "base_permuted")["model.layers.0.self_attn.q_proj.weight"],
                           _tensors(root / "base")["model.layers.0.self_attn.q_proj.weight"])


def _config(root, models, **parameters) -> str:
    cfg = {"merge_method": "hierarchical", "base_model": str(root / "base"),
           "models": [{"model": str(root / m)} for m in models]}
    if parameters:
        cfg["parameters"] = parameters
    return yaml.safe_dump(cfg)


def test_yaml_merging_a_head_permuted_copy_with_the_model_gives_the_model(permuted_ckpts, tmp_path):
    root, _ = permuted_ckpts
    out = merge_from_config(_config(root, ["base_permuted"]), tmp_path / "out", progress=False)
    merged, base = _tensors(out), _tensors(root / "base")
    assert merged.keys() == base.keys()
    for name in base:
        assert torch.equal(merged[name], base[name]), name


def test_yaml_merge_of_a_fine_tune_and_its_permuted_copy_gives_the_fine_tune(permuted_ckpts, tmp_path):
    root, _ = permuted_ckpts
    out = merge_from_config(_config(root, ["ft1", "ft1_permuted"]), tmp_path / "aligned", progress=False)
    merged, ft1 = _tensors(out), _tensors(root / "ft1")
    for name in ft1:
        assert torch.allclose(merged[name], ft1[name], atol=1e-6), name
    # without alignment the heads are averaged with the wrong partners
    out = merge_from_config(_config(root, ["ft1", "ft1_permuted"], alignment="none"), tmp_path / "plain",
                            progress=False)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(_tensors(out)[q], ft1[q], atol=1e-3)


def test_cosine_weights_end_to_end(llama_models, permuted_ckpts, tmp_path):
    """Two fine-tunes without permutation: each tensor is base + sum_i a_i tau_i with the documented a_i."""
    root, _ = permuted_ckpts
    fts = llama_models[1]
    fts[1].save_pretrained(tmp_path / "ft2")
    cfg = yaml.safe_load(_config(root, ["ft1"]))
    cfg["models"] = [{"model": str(root / "ft1"), "parameters": {"weight": 2.0}},
                     {"model": str(tmp_path / "ft2"), "parameters": {"weight": 1.0}}]
    out = merge_from_config(cfg, tmp_path / "out", progress=False)
    merged, w0, w1, w2 = _tensors(out), _tensors(root / "base"), _tensors(root / "ft1"), _tensors(tmp_path / "ft2")
    for name in ["model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight", "lm_head.weight"]:
        t1, t2 = (w1[name] - w0[name]).double(), (w2[name] - w0[name]).double()
        consensus = (2 * t1 + t2) / 3
        c = [float(torch.dot(t.flatten(), consensus.flatten()) / (t.norm() * consensus.norm())) for t in (t1, t2)]
        raw = [2 * max(c[0], 0), max(c[1], 0)]
        a = [r / sum(raw) for r in raw]
        assert torch.allclose(merged[name].double(), w0[name].double() + a[0] * t1 + a[1] * t2, atol=1e-6), name


def test_module_base_needs_head_counts(llama_models, permuted_ckpts):
    root, _ = permuted_ckpts
    base = llama_models[0]
    with pytest.raises(MergeConfigError, match="num_attention_heads"):
        merge(base, [str(root / "base_permuted")], method="hierarchical", progress=False)
    merged = merge(base, [str(root / "base_permuted")], method="hierarchical", progress=False,
                   num_attention_heads=4, num_key_value_heads=2)
    for name, value in base.state_dict().items():
        assert torch.equal(merged.state_dict()[name], value), name


def test_wrong_head_counts_are_refused(permuted_ckpts, tmp_path):
    root, _ = permuted_ckpts
    with pytest.raises(MergeConfigError,
                       match="k_proj.weight has shape \\[16, 32\\], which does not split into 1 heads"):
        merge_from_config(_config(root, ["base_permuted"], num_attention_heads=3, num_key_value_heads=1),
                          tmp_path / "out", progress=False)
    with pytest.raises(MergeConfigError, match="does not divide"):
        merge_from_config(_config(root, ["base_permuted"], num_key_value_heads=3), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _state(names_shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in names_shapes.items()}


@pytest.mark.parametrize("names,why", [
    ({"model.layers.0.mlp.up_proj.weight": (8, 4)}, "it has none"),
    ({"model.layers.0.self_attn.qkv_proj.weight": (12, 4), "model.layers.0.self_attn.o_proj.weight": (4, 4)},
     "qkv_proj"),
    ({"model.layers.0.self_attn.q_proj.weight": (4, 4), "model.layers.0.self_attn.k_proj.weight": (4, 4),
      "model.layers.0.self_attn.o_proj.weight": (4, 4)}, "lacks \\['v_proj.weight'\\]"),
])
def test_unsupported_architectures_are_refused_unless_alignment_is_off(names, why, tmp_path):
    base, other = _state(names, 0), _state(names, 1)
    with pytest.raises(MergeConfigError, match=why) as err:
        merge(base, [other], method="hierarchical", num_attention_heads=2, output_dir=tmp_path / "a", progress=False)
    assert "alignment: none" in str(err.value)
    out = merge(base, [other], method="hierarchical", alignment="none", output_dir=tmp_path / "b", progress=False)
    merged = _tensors(out)
    for name in names:  # one model: the interpolation gives that model (base + (model - base), rounded)
        assert torch.allclose(merged[name], other[name], atol=1e-6)


@pytest.mark.parametrize("params,match", [
    ({"weight": [0.0, 0.0]}, "sum to 0"),
    ({"weight": [1.0, -1.0]}, "outside"),
    ({"alignment": "neurons"}, "must be one of"),
    ({"num_attention_heads": 0}, "outside"),
])
def test_bad_parameters_are_refused(llama_models, params, match):
    base, fts = llama_models
    with pytest.raises(MergeConfigError, match=match):
        merge(base, fts[:2], method="hierarchical", progress=False, **params)


def test_task_vector_inputs_are_aligned_as_models(permuted_ckpts, tmp_path):
    """A task vector of the head-permuted fine-tune is added to the base, then aligned like a model."""
    from hf_taskarith import TaskVector

    root, _ = permuted_ckpts
    tv = TaskVector.from_checkpoints(root / "base", root / "ft1_permuted")
    out = merge(str(root / "base"), [tv], method="hierarchical", output_dir=tmp_path / "out", progress=False)
    merged, ft1 = _tensors(out), _tensors(root / "ft1")
    for name in ft1:
        assert torch.allclose(merged[name], ft1[name], atol=1e-6), name
