"""``tokenizer_source: union``: merging models whose tokenizers differ, over the union vocabulary.

Tiny word-level tokenizers are built offline (``tokenizers``) for tiny Llamas whose
vocabularies overlap partly, in different orders, with different special tokens. The same YAML
is merged by mergekit and by us; mergekit's token ids depend on hash orders, so the outputs are
compared token by token: the same vocabulary, and each token's embedding / LM-head row equal.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from hf_taskarith import merge, merge_from_config
from hf_taskarith.errors import MergeConfigError
from hf_taskarith.merging.tokenizer_union import align_vocab_rows
from tests.mergekit_runs import state_dict as _sd

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

MK_OPTIONS = MergeOptions(lazy_unpickle=True, quiet=True, write_model_card=False)
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _model_with_tokenizer(folder: Path, words: list[str], specials: tuple[str, ...], seed: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from conftest import tiny_llama_config

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    if specials:
        fast.add_special_tokens({"additional_special_tokens": list(specials)})
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(fast.get_vocab()))).save_pretrained(folder)
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def tok_models(tmp_path_factory) -> Path:
    """base (31 words + <|im_start|>), ft1 (20 of them reversed + x0..x5 + <|im_end|>), ft2 (25 + x3, y0)."""
    root = tmp_path_factory.mktemp("union")
    _model_with_tokenizer(root / "base", ["[UNK]"] + [f"w{i}" for i in range(30)], ("<|im_start|>",), seed=0)
    _model_with_tokenizer(root / "ft1", ["[UNK]"] + [f"w{i}" for i in range(20)][::-1] + [f"x{i}" for i in range(6)],
                          ("<|im_end|>",), seed=1)
    _model_with_tokenizer(root / "ft2", ["[UNK]"] + [f"w{i}" for i in range(25)] + ["x3", "y0"], (), seed=2)
    return root


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _compare_with_mergekit(cfg: dict, tmp_path: Path, atol: float) -> tuple[Path, Path]:
    text = yaml.safe_dump(cfg, sort_keys=False)
    ours = merge_from_config(text, tmp_path / "ours", progress=False)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"), options=MK_OPTIONS)
    mine, theirs = _sd(ours), _sd(tmp_path / "mk")
    assert set(mine) == set(theirs)
    v_ours, v_mk = _vocab(ours), _vocab(tmp_path / "mk")
    assert set(v_ours) == set(v_mk)
    tokens = sorted(v_ours)
    for name in VOCAB_TENSORS:
        a = mine[name][torch.tensor([v_ours[t] for t in tokens])]
        b = theirs[name][torch.tensor([v_mk[t] for t in tokens])]
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    for name in set(mine) - set(VOCAB_TENSORS):
        torch.testing.assert_close(mine[name], theirs[name], atol=atol, rtol=0)
    size = json.loads((ours / "config.json").read_text())["vocab_size"]
    assert size == json.loads((tmp_path / "mk" / "config.json").read_text())["vocab_size"] == len(v_ours)
    assert mine["model.embed_tokens.weight"].shape[0] == size
    return ours, tmp_path / "mk"


def test_task_arithmetic_union_equals_mergekit_token_by_token(tok_models, tmp_path):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tok_models / "base"), "tokenizer_source": "union",
           "dtype": "float32", "models": [{"model": str(tok_models / "ft1"), "parameters": {"weight": 0.5}},
                                          {"model": str(tok_models / "ft2"), "parameters": {"weight": 0.3}}]}
    ours, _ = _compare_with_mergekit(cfg, tmp_path, atol=0)
    vocab, base_vocab = _vocab(ours), _vocab(tok_models / "base")
    assert len(vocab) == 40  # 32 of the base, x0..x5, y0, <|im_end|>
    assert all(vocab[t] == i for t, i in base_vocab.items())  # the base's tokens keep their ids
    # new tokens come after the base's, in the order the models are listed (each model's in id order)
    added = sorted((i, t) for t, i in vocab.items() if t not in base_vocab)
    assert [t for _, t in added] == ["x0", "x1", "x2", "x3", "x4", "x5", "y0", "<|im_end|>"]


def test_linear_union_without_base_model_equals_mergekit(tok_models, tmp_path):
    cfg = {"merge_method": "linear", "tokenizer_source": "union", "dtype": "float32",
           "models": [{"model": str(tok_models / "ft1"), "parameters": {"weight": 0.6}},
                      {"model": str(tok_models / "ft2"), "parameters": {"weight": 0.4}}]}
    _compare_with_mergekit(cfg, tmp_path, atol=1e-6)


def test_slerp_union_equals_mergekit(tok_models, tmp_path):
    cfg = {"merge_method": "slerp", "base_model": str(tok_models / "base"), "tokenizer_source": "union",
           "dtype": "float32", "parameters": {"t": 0.4}, "models": [{"model": str(tok_models / "ft1")}]}
    _compare_with_mergekit(cfg, tmp_path, atol=1e-6)


def test_union_merge_loads_and_encodes_every_models_tokens(tok_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge(str(tok_models / "base"), [str(tok_models / "ft1"), str(tok_models / "ft2")], weights=[0.5, 0.5],
                tokenizer_source="union", output_dir=tmp_path / "out", progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("w1 x3 y0 <|im_start|> <|im_end|>").input_ids
    assert len(ids) == 5 and tok.unk_token_id not in ids and max(ids) < len(tok)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, 5, len(tok)) and torch.isfinite(logits).all()


def test_align_vocab_rows_follows_mergekits_fill_rules():
    a = torch.tensor([[10.0], [20.0], [30.0]])
    b = torch.tensor([[100.0], [200.0], [300.0]])
    base = torch.tensor([[1.0], [2.0]])
    # output tokens: 0 in all; 1 only in a; 2 in a and b, not the base; 3 in b and the base; 4 in none
    rows = [torch.tensor([0, 1, 2, -1, -1]),    # a
            torch.tensor([2, -1, 0, 1, -1]),    # b
            torch.tensor([1, -1, -1, 0, -1])]   # base
    out = align_vocab_rows([a, b, base], rows, base_index=2)
    assert out[0].flatten().tolist() == [10.0, 20.0, 30.0, 1.0, 0.0]     # token 3: the base's row
    assert out[1].flatten().tolist() == [300.0, 20.0, 100.0, 200.0, 0.0]  # token 1: the only model's row
    assert out[2].flatten().tolist() == [2.0, 20.0, 65.0, 1.0, 0.0]      # token 2: the mean of a and b
    no_base = align_vocab_rows([a, b, base], rows, base_index=None)
    assert no_base[0][3].item() == (200.0 + 1.0) / 2                    # without a base: the mean


def test_union_refuses_task_vectors_and_models_without_tokenizers(tok_models, tmp_path, llama_checkpoints):
    from transformers import AutoModelForCausalLM

    from hf_taskarith import TaskVector

    tv = TaskVector.from_models(*(AutoModelForCausalLM.from_pretrained(llama_checkpoints / n) for n in ("base", "ft1")))
    with pytest.raises(MergeConfigError, match="union needs every input to be a model checkpoint folder"):
        merge(llama_checkpoints / "base", [tv], tokenizer_source="union", output_dir=tmp_path / "a", progress=False)
    with pytest.raises(MergeConfigError, match="union needs every model's tokenizer; .*ft1 has none"):
        merge(str(tok_models / "base"), [str(llama_checkpoints / "ft1")], tokenizer_source="union",
              output_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_union_with_slices_is_refused(tok_models, tmp_path):
    cfg = {"merge_method": "passthrough", "tokenizer_source": "union",
           "slices": [{"sources": [{"model": str(tok_models / "ft1"), "layer_range": [0, 2]}]}]}
    with pytest.raises(MergeConfigError, match="union .* not supported with slices"):
        merge_from_config(cfg, tmp_path / "out", progress=False)
