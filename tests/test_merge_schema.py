"""The typed merge config (hf_taskarith/merging/schema.py): one clear line per mistake, the JSON
schema (and its committed copy, docs/merge_config.schema.json), verbatim parameter forms,
``slices``, and the output keys ``name`` and ``chat_template``, and the card's ``base_model`` list."""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from hf_taskarith.errors import MergeConfigError
from hf_taskarith.merging.card import hub_parents, is_hub_id, render_merge_card
from hf_taskarith.merging.chat_template import BUILTIN_CHAT_TEMPLATES, builtin_chat_template
from hf_taskarith.merging.config import MergeConfig, merge_from_config
from hf_taskarith.merging.report import MergeReport, MergeSummary
from hf_taskarith.merging.schema import MergeConfigSchema, json_schema

DOCS_SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "merge_config.schema.json"
HEAD = "merge_method: ties\nbase_model: b\n"


def _error(text: str) -> str:
    with pytest.raises(MergeConfigError) as e:
        MergeConfig.from_yaml(text)
    return str(e.value)


def _assert_clean(message: str) -> None:
    for noise in ("pydantic", "http", "For further information", "Traceback", "validation error"):
        assert noise not in message, message


# -- one clear line per mistake ---------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (HEAD + "modelz: [{model: a}]\n",
     r"^unknown config key\(s\) \['modelz'\]; valid keys: .* Did you mean 'models'\?$"),
    (HEAD + "models: [{model: a, params: {weight: 1}}]\n",
     r"^models\[0\]: unknown key\(s\) \['params'\]; valid: \['model', 'parameters'\]\. Did you mean 'parameters'\?$"),
    (HEAD + "models: a\n", r"^models: got 'a' \(str\); expected a list\.$"),
    (HEAD + "models: [{model: a}, {parameters: {weight: 1}}]\n", r"^models\[1\]: needs a 'model' key\.$"),
    (HEAD + "models: [7]\n", r"^models\[0\]: got 7 \(int\); expected a path / Hub id, or a mapping"),
    (HEAD + "models: [{model: a, parameters: [0.5]}]\n",
     r"^models\[0\]\.parameters: got \[0\.5\] \(list\); expected a mapping\.$"),
    (HEAD + "models: [{model: a, parameters: {density: {foo: 1}}}]\n",
     r"^models\[0\]\.parameters\.density: unknown key\(s\) \['foo'\]; a conditional value has 'filter'"),
    (HEAD + "models: [{model: a, parameters: {weight: {filter: mlp}}}]\n",
     r"^models\[0\]\.parameters\.weight: needs a 'value' key"),
    (HEAD + "models: [{model: a}]\nparameters: {weight: []}\n",
     r"^parameters\.weight: got an empty list; expected one "),
    (HEAD + "models: [{model: a}]\nparameters: {t: [0.5, {value: 1}]}\n",
     r"^parameters\.t: got .* a list mixing scalars and mappings; expected"),
    (HEAD + "models: [{model: a}]\ndtype: fp8\n", r"^dtype: got 'fp8' \(str\); expected one of 'bfloat16'"),
    (HEAD + "models: [{model: a}]\nseed: -1\n", r"^seed must be a non-negative integer, got -1 \(int\); write a whole"),
    (HEAD + "models: [{model: a}]\ntokenizer_source: 5\n",
     r"^tokenizer_source: got 5 \(int\); expected 'base', 'union'"),
    (HEAD + "models: [{model: a}]\nchat_template: chatmll\n",
     r"^chat_template: got 'chatmll', neither a built-in template nor a Jinja template; expected 'auto', one of "
     r"\['alpaca', 'chatml', 'exaone', 'llama3', 'mistral'\]"),
    (HEAD + "models: [{model: a}]\nchat_template: '{% for m in messages %}{{ m.content }}'\n",
     r"^chat_template: the Jinja template does not parse: .*\(template line 1\); fix the template\.$"),
    ("merge_method: ties\nbase_model: 5\nmodels: [{model: a}]\n",
     r"^base_model: got 5 \(int\); expected a local path or a Hub id"),
    (HEAD + "models: [{model: a}]\nmax_shard_size: true\n", r"^max_shard_size: got True \(bool\); expected a size"),
    (HEAD + "slices: [{sources: [{model: a, layer_range: [3, 1]}]}]\n",
     r"^slices\[0\]\.sources\[0\]\.layer_range: \[3, 1\] is empty or negative; expected \[start, end\]"),
    (HEAD + "slices: [{sources: [{model: a, layer_range: [0]}]}]\n",
     r"^slices\[0\]\.sources\[0\]\.layer_range: got \[0\] \(list\); expected two layer indices \[start, end\]\.$"),
    (HEAD + "slices: [{sources: []}]\n", r"^slices\[0\]\.sources: empty; list at least one"),
    (HEAD + "models: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 2]}]}]\n",
     r"^config has both models: and slices:; give one"),
    (HEAD + "models: [{model: a}]\ntokenizer: {source: base}\n",
     r"^config key 'tokenizer': tokenizer blocks are not supported; use tokenizer_source\.$"),
    ("base_model: b\nmodels: [{model: a}]\n", r"^config needs merge_method \(e\.g\. task_arithmetic"),
    (HEAD + "models: []\n", r"^config needs a non-empty models: list"),
])
def test_each_mistake_is_one_clear_line(text, expected):
    message = _error(text)
    assert "\n" not in message, message
    assert re.search(expected, message), message
    _assert_clean(message)


def test_several_mistakes_are_reported_at_once_one_line_each():
    text = (HEAD + "models:\n  - {model: a, parameters: {density: {foo: 1}}}\n  - {parameters: {weight: 1}}\n"
            "dtype: fp8\nseed: abc\nmodles: 1\n")
    message = _error(text)
    lines = message.splitlines()
    assert lines[0] == "merge config has 5 mistakes:"
    body = [line.removeprefix("  - ") for line in lines[1:]]
    assert len(body) == 5 and all(line.startswith("  - ") for line in lines[1:])
    for where in ("unknown config key(s) ['modles']", "models[0].parameters.density:", "models[1]: needs a 'model'",
                  "dtype:", "seed must be"):
        assert sum(line.startswith(where) for line in body) == 1, (where, message)
    _assert_clean(message)


def test_the_schema_checks_structure_and_leaves_method_parameters_to_the_registry():
    """A misspelt parameter name passes the schema (it depends on the method) and is refused by
    the method's parameter specs when the merge is prepared."""
    cfg = MergeConfig.from_yaml(HEAD + "models: [{model: a, parameters: {desnity: 0.5}}]\n")
    assert cfg.model_parameters == [{"desnity": 0.5}]
    with pytest.raises(MergeConfigError, match="desnity"):
        cfg.merge_kwargs()


# -- parameter forms and slices pass verbatim -----------------------------------------------
def test_parameter_forms_are_passed_verbatim():
    weight = [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.5}]
    data = {"merge_method": "ties", "base_model": "b",
            "models": ["a", {"model": "c", "parameters": {"weight": weight, "density": [0.3, 0.6], "flag": True}}],
            "parameters": {"t": {"filter": "mlp", "value": 0.3}, "normalize": False, "mode": "x"}}
    cfg = MergeConfig.from_dict(json.loads(json.dumps(data)))
    assert cfg.models == ["a", "c"]
    assert cfg.model_parameters == [{}, data["models"][1]["parameters"]]
    assert cfg.parameters == data["parameters"]
    assert isinstance(cfg.model_parameters[1]["weight"][0], dict) and cfg.slices is None


def test_slices_are_stored_with_model_paths_resolved(tmp_path):
    (tmp_path / "m1").mkdir()
    text = ("merge_method: passthrough\nslices:\n"
            "  - sources: [{model: m1, layer_range: [0, 2], parameters: {scale: [1, 0.5]}}]\n"
            "  - sources: [{model: hub/x, layer_range: [1, 3]}]\n    parameters: {scale: 2}\n")
    (tmp_path / "c.yml").write_text(text)
    cfg = MergeConfig.from_yaml(tmp_path / "c.yml")
    assert cfg.models == [] and cfg.model_parameters == []
    assert cfg.slices == [
        {"sources": [{"model": str(tmp_path / "m1"), "layer_range": [0, 2], "parameters": {"scale": [1, 0.5]}}],
         "parameters": {}},
        {"sources": [{"model": "hub/x", "layer_range": [1, 3], "parameters": {}}], "parameters": {"scale": 2}}]
    assert cfg.source_text == text


def test_tokenizer_source_union_stays_a_keyword_and_models_resolve(tmp_path):
    (tmp_path / "a").mkdir()
    cfg = MergeConfig.from_dict({"merge_method": "ties", "base_model": "b", "models": ["a"],
                                 "tokenizer_source": "union"}, base_dir=tmp_path)
    assert cfg.tokenizer_source == "union" and cfg.models == [str(tmp_path / "a")]
    cfg = MergeConfig.from_dict({"merge_method": "ties", "base_model": "b", "models": ["a"],
                                 "tokenizer_source": "a", "name": "n", "chat_template": "chatml"}, base_dir=tmp_path)
    assert cfg.tokenizer_source == str(tmp_path / "a") and (cfg.name, cfg.chat_template) == ("n", "chatml")


# -- JSON schema -----------------------------------------------------------------------------
def test_committed_json_schema_is_current():
    want = json.dumps(json_schema(), indent=2) + "\n"
    assert DOCS_SCHEMA.read_text() == want, (
        "docs/merge_config.schema.json is stale; regenerate it with "
        "`hf-taskarith merge --print-schema > docs/merge_config.schema.json`")


def test_json_schema_is_self_contained_and_strict():
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == ["merge_method"]
    assert set(schema["properties"]) == set(MergeConfigSchema.model_fields)
    refs = []

    def walk(node):
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    assert refs and all(r.removeprefix("#/$defs/") in schema["$defs"] for r in refs)
    for name, definition in schema["$defs"].items():
        assert definition.get("additionalProperties") is False, name
    assert schema["properties"]["seed"]["minimum"] == 0


def test_json_schema_validates_what_the_schema_accepts():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = yaml.safe_load(HEAD + "models: [a, {model: c, parameters: {weight: [{filter: mlp, value: [0, 1]}]}}]\n")
    assert not list(validator.iter_errors(good))
    assert list(validator.iter_errors({**good, "modelz": 1}))
    assert list(validator.iter_errors({**good, "dtype": "fp8"}))


def test_cli_prints_the_schema(capsys):
    from hf_taskarith.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--print-schema"])
    assert exit_info.value.code == 0
    assert json.loads(capsys.readouterr().out) == json_schema()


def test_dtype_names_are_the_engines():
    torch_api = pytest.importorskip("hf_taskarith.merging.api")
    from hf_taskarith.merging.schema import DTYPE_NAMES

    assert set(DTYPE_NAMES) == set(torch_api.DTYPES)


# -- chat templates --------------------------------------------------------------------------
CONVERSATION = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def _render(template: str, messages=CONVERSATION) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    out, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True,
                                   bos_token="<s>", eos_token="</s>")
    return out[0]


def _mergekit_template(name: str) -> str:
    data = pytest.importorskip("mergekit._data.chat_templates")
    return importlib.resources.files(data).joinpath(f"{name}.jinja").read_text()


@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_builtin_templates_render_as_mergekits(name):
    assert _render(builtin_chat_template(name)) == _render(_mergekit_template(name))
    short = CONVERSATION[1:2]
    assert _render(builtin_chat_template(name), short) == _render(_mergekit_template(name), short)


def test_builtin_llama3_is_mergekits_without_its_stray_newlines():
    """mergekit's llama3.jinja leaves a newline after each ``<|eot_id|>`` (an expression line);
    Llama 3's own format has none (docs/mergekit_compatibility.md)."""
    ours, theirs = _render(builtin_chat_template("llama3")), _render(_mergekit_template("llama3"))
    assert ours == theirs.replace("<|eot_id|>\n", "<|eot_id|>")
    assert ours.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>")


def test_builtin_alpaca_and_exaone_render_their_formats():
    assert _render(builtin_chat_template("alpaca")) == (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\nBye\n\n### Response:\n")
    assert _render(builtin_chat_template("exaone")) == (
        "[|system|]Be brief. [|endofturn|]\n[|user|] Hi\n[|assistant|]Hello![|endofturn|]\n[|user|]Bye\n"
        "[|assistant|]")
    assert _render(builtin_chat_template("exaone"), CONVERSATION[1:2]) == (
        "[|system|][|endofturn|]\n[|user|] Hi\n[|assistant|]")
    assert set(BUILTIN_CHAT_TEMPLATES) == {"alpaca", "chatml", "exaone", "llama3", "mistral"}


def test_mistral_template_refuses_roles_out_of_turn():
    from transformers.utils.chat_template_utils import render_jinja_template

    with pytest.raises(Exception, match="alternate user, assistant"):
        render_jinja_template(conversations=[[{"role": "assistant", "content": "x"}]],
                              chat_template=builtin_chat_template("mistral"), bos_token="<s>", eos_token="</s>")


def _save_tokenizer(folder: Path, template: str | None) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hi", "bye"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(folder)


@pytest.fixture
def tok_ckpts(tmp_path, llama_checkpoints):
    """base/ft1/ft2 with tokenizers: base without a chat template, ft1 and ft2 with ``{{ 'FT' }}``-style ones."""
    root = tmp_path / "in"
    for name, template in [("base", None), ("ft1", "{{ 'ft template' }}"), ("ft2", "{{ 'ft template' }}")]:
        shutil.copytree(llama_checkpoints / name, root / name)
        _save_tokenizer(root / name, template)
    return root


def _yaml(root: Path, extra: str) -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\nmodels:\n"
            f"  - {{model: {root / 'ft1'}, parameters: {{weight: 0.5}}}}\n"
            f"  - {{model: {root / 'ft2'}, parameters: {{weight: 0.5}}}}\n{extra}")


@pytest.mark.parametrize("fast_path", [True, False], ids=["torch-free", "torch"])
def test_chat_template_and_name_reach_the_output(tok_ckpts, tmp_path, fast_path):
    from transformers import AutoTokenizer

    out = merge_from_config(_yaml(tok_ckpts, "chat_template: chatml\nname: my-merge\n"), tmp_path / "out",
                            progress=False, fast_path=fast_path)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == builtin_chat_template("chatml")
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(CONVERSATION[1:3], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n Hi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
    card = (out / "README.md").read_text()
    assert "\n# my-merge\n" in card
    assert json.loads((out / "merge_report.json").read_text())["name"] == "my-merge"


def test_chat_template_auto_takes_the_inputs_most_common_one(tok_ckpts, tmp_path):
    from transformers import AutoTokenizer

    out = merge_from_config(_yaml(tok_ckpts, "chat_template: auto\n"), tmp_path / "out", progress=False)
    assert AutoTokenizer.from_pretrained(out).chat_template == "{{ 'ft template' }}"
    assert "\n# Merged model (task_arithmetic)\n" in (out / "README.md").read_text()


def test_inline_chat_template_replaces_the_copied_one(tok_ckpts, tmp_path):
    from transformers import AutoTokenizer

    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    extra = f"tokenizer_source: {tok_ckpts / 'ft1'}\nchat_template: {json.dumps(inline)}\n"
    out = merge_from_config(_yaml(tok_ckpts, extra), tmp_path / "out", progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == inline  # chat_template.jinja (copied from ft1) was replaced too
    assert tok.apply_chat_template(CONVERSATION[1:2], tokenize=False) == "[user]  Hi\n"


def test_name_of_a_dict_config_is_honoured(llama_checkpoints, tmp_path):
    data = {"merge_method": "task_arithmetic", "base_model": str(llama_checkpoints / "base"),
            "models": [{"model": str(llama_checkpoints / "ft1"), "parameters": {"weight": 0.5}}], "name": "dict-merge"}
    out = merge_from_config(data, tmp_path / "out", progress=False)
    assert "\n# dict-merge\n" in (out / "README.md").read_text()
    assert yaml.safe_load((out / "hf_taskarith_merge.yml").read_text()) == data


# -- the card's base_model list -----------------------------------------------------------------
def test_hub_ids_are_told_from_local_paths(tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    assert is_hub_id("meta-llama/Llama-3.1-8B") and is_hub_id("gpt2")
    assert not any(is_hub_id(x) for x in [str(tmp_path / "org" / "local"), "./x", "~/m", "a/b/c", "model 0",
                                          "<state dict>", ""])
    assert hub_parents(["org/base", str(tmp_path), "org/a", "org/base", "org/b"]) == ["org/base", "org/a", "org/b"]


def _summary(base: str, inputs: list[str]) -> MergeSummary:
    return MergeSummary(method="ties", description="d", reference="", params={"weight": [1.0] * len(inputs)},
                        seed=0, dtype=None, base_label=base, input_labels=inputs, base_folder=None,
                        tokenizer_folder=None)


def test_card_lists_every_hub_input_under_base_model(tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard(render_merge_card(_summary("org/base", ["org/ft-a", str(tmp_path), "org/ft-b"]), MergeReport(),
                                       config_yaml=None, name="fancy"))
    assert card.data.base_model == ["org/base", "org/ft-a", "org/ft-b"]
    assert card.data.base_model_relation == "merge"
    assert "\n# fancy\n" in card.content
    local = ModelCard(render_merge_card(_summary(str(tmp_path), [str(tmp_path)]), MergeReport(), config_yaml=None))
    assert local.data.base_model is None and getattr(local.data, "base_model_relation", None) is None
    assert "\n# Merged model (ties)\n" in local.content


def test_numbers_in_exponent_notation_are_numbers_as_in_yaml_1_2():
    """PyYAML (YAML 1.1) reads ``1e-3`` as a string; mergekit users write it as a number."""
    import yaml

    from hf_taskarith.merging.config import MergeConfig

    text = """
merge_method: nearswap
base_model: b
models:
  - model: a
parameters:
  t: 1e-3
  other: [1E2, 2.5e-1, "x"]
  cond: [{filter: mlp, value: -2e-2}, {value: 3}]
"""
    data = yaml.safe_load(text)
    assert data["parameters"]["t"] == "1e-3"  # the YAML 1.1 reading this test is about
    from hf_taskarith.merging.schema import validate_config

    params = validate_config(data).parameters
    assert params["t"] == 0.001 and isinstance(params["t"], float)
    assert params["other"] == [100.0, 0.25, "x"]
    assert params["cond"] == [{"filter": "mlp", "value": -0.02}, {"value": 3}]
    assert MergeConfig.from_yaml(text).parameters["t"] == 0.001
