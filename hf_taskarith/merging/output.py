"""The non-weight files of a merged checkpoint: config, tokenizer, generation config, card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..version import __version__
from .report import MergeReport, MergeSummary

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "spiece.model", "sentencepiece.bpe.model")


def write_side_files(folder: Path, summary: MergeSummary, report: MergeReport, *, config_yaml: str | None,
                     name: str | None = None, chat_template: str | None = None) -> None:
    """Write config.json (dtype and vocabulary size updated), generation config, tokenizer
    files, the merge YAML, the model card and ``merge_report.json`` into ``folder``.

    Args:
        folder: the (temporary) output folder.
        summary, report: what the merge was asked to do and what it did.
        config_yaml: the merge config's YAML text, recorded as ``hf_taskarith_merge.yml``;
            its ``name`` and ``chat_template`` keys are honoured unless given here.
        name: the model card's title (default: the config's ``name``).
        chat_template: ``auto``, a built-in name or a Jinja template, written into the copied
            tokenizer (:mod:`.chat_template`; default: the config's ``chat_template``).

    Note:
        Small files only: the cost is reading the inputs' tokenizer files (``auto``: each input's).
    """
    options = _config_options(config_yaml)
    name = name if name is not None else options.get("name")
    chat_template = chat_template if chat_template is not None else options.get("chat_template")
    base_folder = summary.base_folder
    tok_folder = summary.tokenizer_folder
    if base_folder is not None:
        cfg_path = base_folder / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            vocab_rows = {v.output_rows for v in report.vocab}
            if len(vocab_rows) == 1 and "vocab_size" in cfg:
                cfg["vocab_size"] = vocab_rows.pop()
            if summary.dtype is not None:
                key = "dtype" if "dtype" in cfg else "torch_dtype"
                cfg[key] = summary.dtype
            (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        gen = base_folder / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, folder / gen.name)
    if tok_folder is not None:
        for file_name in TOKENIZER_FILES:
            if (tok_folder / file_name).is_file():
                shutil.copy2(tok_folder / file_name, folder / file_name)
    if chat_template is not None:
        _set_chat_template(folder, summary, chat_template)
    if config_yaml is not None:
        (folder / "hf_taskarith_merge.yml").write_text(config_yaml)
    from .card import render_merge_card

    (folder / "README.md").write_text(render_merge_card(summary, report, config_yaml=config_yaml, name=name))
    (folder / "merge_report.json").write_text(json.dumps({
        "library_version": __version__, "name": name, "method": summary.method, "params": summary.params,
        "seed": summary.seed,
        "base": summary.base_label, "inputs": summary.input_labels,
        "merged_tensors": report.merged, "copied_non_float": report.copied_non_float,
        "vocab": [v.describe() for v in report.vocab], "skipped": report.skipped,
        "fingerprint_mismatch": report.fingerprint_mismatch,
    }, indent=2))


def _config_options(config_yaml: str | None) -> dict[str, Any]:
    """The ``name`` and ``chat_template`` of a config's YAML text (already validated by the
    schema when it came from a config file; other text is read leniently)."""
    if not config_yaml:
        return {}
    try:
        data = yaml.safe_load(config_yaml)
    except yaml.YAMLError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("name", "chat_template") if isinstance(data.get(k), str)}


def _set_chat_template(folder: Path, summary: MergeSummary, value: str) -> None:
    """Resolve ``value`` (``auto`` reads the inputs' tokenizers) and write it into the output's tokenizer."""
    from ..errors import MergeConfigError
    from .chat_template import check_chat_template, resolve_chat_template, write_chat_template

    try:
        check_chat_template(value)
    except ValueError as e:
        raise MergeConfigError(f"chat_template: {e}.") from None
    folders = [f for f in (summary.base_folder, *(_local_folder(x) for x in summary.input_labels)) if f is not None]
    template = resolve_chat_template(value, folders=folders)
    if template is not None:
        write_chat_template(folder, template)


def _local_folder(label: str) -> Path | None:
    """The folder holding an input's tokenizer files: a local folder, or a Hub id's cached snapshot."""
    path = Path(label)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        for file_name in ("chat_template.jinja", "tokenizer_config.json"):
            cached = try_to_load_from_cache(label, file_name)
            if isinstance(cached, str):
                return Path(cached).parent
    except ValueError:  # not a valid repo id
        return None
    return None
