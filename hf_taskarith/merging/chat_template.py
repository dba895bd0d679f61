"""The ``chat_template`` key of a merge config: which chat template the merged tokenizer gets.

As in mergekit, the value is one of:

- ``auto``: the template most of the inputs (base first, then the models) already have;
  none is written if none of them has one;
- a built-in name: ``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral`` (our own
  templates under ``chat_templates/``; the formats of those names);
- a Jinja template, given inline.

It is written into the output's ``tokenizer_config.json`` (key ``chat_template``), and into its
``chat_template.jinja`` if the copied tokenizer has one (transformers reads that file first).

Note:
    A template is parsed (not rendered) when the config is validated, so a syntax error is
    reported before any weight is read. ``auto`` reads each input's small tokenizer files.

Example:
    >>> check_chat_template("chatml")
    >>> resolve_chat_template("chatml", folders=[]).startswith("{#- ChatML")
    True
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "chat_templates"
#: the built-in template names (``chat_template: chatml``)
BUILTIN_CHAT_TEMPLATES = tuple(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))


def check_chat_template(value: str) -> None:
    """Check a ``chat_template`` value: ``auto``, a built-in name, or a Jinja template that parses.

    Raises:
        ValueError: naming the value and what is accepted (the schema turns it into one line
            of a :class:`~hf_taskarith.errors.MergeConfigError`).
    """
    if value == "auto" or value in BUILTIN_CHAT_TEMPLATES:
        return
    if "{{" not in value and "{%" not in value:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise ValueError(f"got {shown!r}, neither a built-in template nor a Jinja template; expected 'auto', one of "
                         f"{list(BUILTIN_CHAT_TEMPLATES)}, or a Jinja template (with {{{{ ... }}}} / {{% ... %}})")
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the Jinja template does not parse: {e.message} (template line {e.lineno}); fix the "
                         "template") from None


def builtin_chat_template(name: str) -> str:
    """The text of a built-in template (``chatml``, ...)."""
    if name not in BUILTIN_CHAT_TEMPLATES:
        raise ValueError(f"unknown built-in chat template {name!r}; available: {list(BUILTIN_CHAT_TEMPLATES)}")
    return (TEMPLATE_DIR / f"{name}.jinja").read_text()


def read_chat_template(folder: Path) -> str | None:
    """The chat template of a tokenizer folder: ``chat_template.jinja``, else the ``chat_template``
    of ``tokenizer_config.json`` (its ``default`` entry when it holds several); ``None`` if none."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text().strip() or None
    cfg_file = folder / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    try:
        template = json.loads(cfg_file.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def resolve_chat_template(value: str, *, folders: Iterable[Path]) -> str | None:
    """The template text for a checked ``chat_template`` value.

    Args:
        value: ``auto``, a built-in name or a Jinja template.
        folders: the inputs' tokenizer folders (base first), read for ``auto``.

    Returns:
        The template, or ``None`` for ``auto`` when no input has one.
    """
    if value == "auto":
        found = [t for t in (read_chat_template(f) for f in folders) if t]
        if not found:
            logger.warning("chat_template: auto, but none of the inputs has a chat template; none is written.")
            return None
        return Counter(found).most_common(1)[0][0]  # ties: the first met (base, then models in order)
    if value in BUILTIN_CHAT_TEMPLATES:
        return builtin_chat_template(value)
    return value


def write_chat_template(folder: Path, template: str) -> bool:
    """Set ``template`` as the chat template of the tokenizer in ``folder``.

    Returns:
        False (with a warning, as mergekit) when ``folder`` has no ``tokenizer_config.json``.
    """
    cfg_file = folder / "tokenizer_config.json"
    if not cfg_file.is_file():
        logger.warning("chat_template given, but the output has no tokenizer_config.json (the tokenizer source has "
                       "no tokenizer); the chat template is not saved.")
        return False
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = template
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if (folder / "chat_template.jinja").is_file():
        (folder / "chat_template.jinja").write_text(template)
    return True
