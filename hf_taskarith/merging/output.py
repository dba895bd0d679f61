"""The non-weight files of a merged checkpoint: config, tokenizer, generation config, card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..version import __version__
from .report import MergeReport, MergeSummary

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "spiece.model", "sentencepiece.bpe.model")


def write_side_files(folder: Path, summary: MergeSummary, report: MergeReport, *, config_yaml: str | None) -> None:
    """Write config.json (dtype and vocabulary size updated), generation config, tokenizer
    files, the merge YAML, the model card and ``merge_report.json`` into ``folder``."""
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
        for name in TOKENIZER_FILES:
            if (tok_folder / name).is_file():
                shutil.copy2(tok_folder / name, folder / name)
    if config_yaml is not None:
        (folder / "hf_taskarith_merge.yml").write_text(config_yaml)
    from .card import render_merge_card

    (folder / "README.md").write_text(render_merge_card(summary, report, config_yaml=config_yaml))
    (folder / "merge_report.json").write_text(json.dumps({
        "library_version": __version__, "method": summary.method, "params": summary.params, "seed": summary.seed,
        "base": summary.base_label, "inputs": summary.input_labels,
        "merged_tensors": report.merged, "copied_non_float": report.copied_non_float,
        "vocab": [v.describe() for v in report.vocab], "skipped": report.skipped,
        "fingerprint_mismatch": report.fingerprint_mismatch,
    }, indent=2))
