"""Every code block of README.md and docs/*.md runs here, as written.

How it works (the least magic we found):

* Each page's ```python blocks run in order, in one namespace, in a fresh temporary working
  directory. Names a page takes as given (``base``, ``tv``, ``ds``, ``evaluate``...) are set by
  that page's *given* function below, from tiny models built from configs (no downloads).
* Hub ids in the docs (``my-org/base``, ``sentence-transformers/all-MiniLM-L6-v2``) are plain
  folders of that name in the working directory: transformers and hf_taskarith load an existing
  local folder before they try the Hub, so the code is not patched at all.
* Calls that talk to the Hub without ``endpoint=`` go to an embedded Hub (``embedded_hub``): the
  test points ``huggingface_hub.constants.ENDPOINT`` at it, as docs/hub_server.md tells users to.
* ```bash / ```console lines that call ``hf-taskarith``: a synopsis line (``[--opt]`` or
  UPPER_CASE placeholders) is checked against ``hf-taskarith COMMAND --help`` (every option it
  shows must exist); the other lines run in bash, in the page's working directory, a
  ``hub serve`` line in the background. Lines that do not call ``hf-taskarith`` (``bash
  scripts/*.sh``, ``python benchmarks/...``, ``export``) are not this test's: the scripts have
  their own tests (tests/test_demo.py) or are long studies; ``export`` lines run with the block.
* A block marked ``<!-- doc-test: skip (reason) -->`` just before it is skipped and counted (the
  count is printed and capped); ``<!-- doc-test: signature -->`` marks a listing of signatures,
  checked against ``inspect.signature`` of the real function instead of being run.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_SKIPPED = 6
_MARK = re.compile(r"<!--\s*doc-test:\s*(skip|signature)\s*(?:\((.*)\))?\s*-->")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    mark: str | None = None     # "skip" or "signature"
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """The fenced python/bash/console blocks of a Markdown page, with their doc-test marks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if m and m.group(1) in ("python", "bash", "console", "sh", "shell"):
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            prev = next((x for x in reversed(lines[:i]) if x.strip()), "")
            mark = _MARK.search(prev)
            out.append(Block(str(path.relative_to(ROOT)), i + 1, m.group(1), "\n".join(lines[i + 1:j]),
                             mark.group(1) if mark else None, (mark.group(2) or "") if mark else ""))
            i = j
        elif lines[i].startswith("```"):   # another fence (yaml, text): skip to its end
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
        i += 1
    return out


ALL_BLOCKS = [b for p in PAGES for b in extract_blocks(p)]


# ---------------------------------------------------------------------------------------------
# tiny stand-ins

def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kw = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=32, num_labels=3)
    kw.update(overrides)
    return BertConfig(**kw)


def tiny_llama(seed: int = 0):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def perturbed(model, seed: int, scale: float = 0.02):
    from tests.conftest import perturbed as _perturbed
    return _perturbed(model, seed, scale)


def save_tokenizer(folder: Path, vocab_size: int = 64) -> None:
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "great", "awful", "film", "food"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)


def token_dataset(n: int = 8, num_labels: int = 3, seq: int = 6):
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (n, seq), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones(n, seq).long().tolist(),
                                       "labels": (torch.arange(n) % num_labels).tolist()})


def training_args(out: str = "out"):
    from transformers import TrainingArguments
    return TrainingArguments(out, max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True)


def bert_cls(num_labels: int = 3, **overrides):
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_labels=num_labels, **overrides)).eval()


def lora_adapter(folder: str, base) -> None:
    import peft

    from hf_taskarith.adapters import LinearizedLoraConfig
    model = peft.get_peft_model(copy.deepcopy(base), LinearizedLoraConfig(
        r=8, target_modules=["query", "value"], task_type="SEQ_CLS", modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# what each page takes as given

def given_readme(ns: dict) -> None:
    base = tiny_llama()
    base.save_pretrained("my-org/base")
    perturbed(base, 1).save_pretrained("my-org/base-math")
    perturbed(base, 2).save_pretrained("my-org/base-code", max_shard_size="30KB")
    bert_cls().save_pretrained("bert")
    lora_adapter("task_b", bert_cls())
    ns.update(path="bert", ds=token_dataset())


def given_adapters(ns: dict) -> None:
    base = bert_cls()
    lora_adapter("out/task_b", base)
    ns.update(base=base, args=training_args(), ds=token_dataset())


def _task_vector_pair():
    from hf_taskarith import TaskVector
    base = tiny_llama()
    return base, TaskVector.from_models(base, perturbed(base, 1)), TaskVector.from_models(base, perturbed(base, 2))


def given_compression(ns: dict) -> None:
    from hf_taskarith import TaskVector
    _, tv, _ = _task_vector_pair()
    ns.update(tv=tv, TaskVector=TaskVector)


def given_task_vectors(ns: dict) -> None:
    from hf_taskarith import TaskVector
    base = tiny_llama()
    ft = perturbed(base, 1)
    base.save_pretrained("base")
    ft.save_pretrained("ft")
    TaskVector.from_models(base, ft).save_pretrained("saved")
    ns.update(TaskVector=TaskVector, base=base, finetuned=ft, base_sd=base.state_dict(), ft_sd=ft.state_dict())


def given_hub(ns: dict) -> None:
    from hf_taskarith import TaskVector, check_compatibility
    base, tv, tv2 = _task_vector_pair()
    tv.save_pretrained("tv")
    ns.update(base=base, tv=tv, tv2=tv2, model=perturbed(base, 9), TaskVector=TaskVector,
              check_compatibility=check_compatibility, repo_id="me/signature-check", same_keywords={})


def given_linearized(ns: dict) -> None:
    from hf_taskarith import TaskVector
    model = bert_cls(num_labels=2, num_hidden_layers=12)
    model.save_pretrained("bert")
    tv_a = TaskVector.from_models(model, perturbed(model, 1))
    tv_b = TaskVector.from_models(model, perturbed(model, 2))
    ids = torch.randint(5, 64, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ns.update(path="bert", ds=token_dataset(num_labels=2), model=model, tv_a=tv_a, tv_b=tv_b, ids=ids, mask=mask,
              y=torch.tensor([0, 1, 0, 1]), batch={"input_ids": ids, "attention_mask": mask}, **_text_encoder())


def _text_encoder() -> dict:
    """A tiny BERT encoder, its word-level tokenizer, a frozen head and two small text datasets
    (train_encoder's inputs)."""
    import datasets
    from transformers import BertModel, BertTokenizer

    words = ["good", "fine", "great", "bad", "awful", "poor", "the", "film", "was", "a"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    g = torch.Generator().manual_seed(0)
    label = [int(i) for i in torch.randint(0, 2, (48,), generator=g)]
    text = [f"the film was {words[3 * y + int(torch.randint(0, 3, (), generator=g))]}" for y in label]
    data = datasets.Dataset.from_dict({"text": text, "label": label})
    return {"encoder": BertModel(tiny_bert_config(vocab_size=len(vocab)), add_pooling_layer=False),
            "tok": BertTokenizer(vocab=vocab), "head": torch.nn.Linear(16, 2),
            "train_ds": data.select(range(32)), "val_ds": data.select(range(32, 48))}


def given_evaluation(ns: dict) -> None:
    """A tiny BERT trunk, one linear head per task, fixed random inputs: real (if meaningless) accuracies."""
    from transformers import BertModel

    from hf_taskarith import TaskVector
    torch.manual_seed(0)
    base = BertModel(tiny_bert_config()).eval()
    tasks = ("mood", "topic", "tense")
    g = torch.Generator().manual_seed(0)
    inputs = {t: {s: torch.randint(5, 64, (96, 6), generator=g) for s in ("val", "test")} for t in tasks}
    labels = {t: {s: torch.randint(0, 2, (96,), generator=g) for s in ("val", "test")} for t in tasks}
    heads = {t: torch.nn.Linear(16, 2) for t in tasks}
    task_vectors = {t: TaskVector.from_models(base, perturbed(base, i + 1, 0.05)) for i, t in enumerate(tasks)}

    def features(model, batch):
        return model(input_ids=batch).last_hidden_state[:, 0]

    def evaluate(model, split):
        with torch.no_grad():
            return {t: (heads[t](features(model, inputs[t][split])).argmax(-1) == labels[t][split])
                    .float().mean().item() for t in tasks}

    def predict(model, task):
        with torch.no_grad():
            return heads[task](features(model, inputs[task]["test"])).argmax(-1)

    Path("out").mkdir()
    ns.update(torch=torch, copy=copy, base=base, tv_mood=task_vectors["mood"], tv_topic=task_vectors["topic"],
              tv_tense=task_vectors["tense"], lin_tv_mood=task_vectors["mood"], lin_tv_topic=task_vectors["topic"],
              evaluate=evaluate, predict=predict, heads=heads, features=features,
              val_ids={t: inputs[t]["val"] for t in tasks})


GIVENS: dict[str, Callable[[dict], None]] = {
    "README.md": given_readme, "docs/adapters.md": given_adapters, "docs/compression.md": given_compression,
    "docs/task_vectors.md": given_task_vectors, "docs/hub.md": given_hub, "docs/linearized.md": given_linearized,
    "docs/evaluation.md": given_evaluation,
}
HUB_PAGES = {"README.md", "docs/hub.md", "docs/hub_server.md", "docs/linearized.md"}


# ---------------------------------------------------------------------------------------------
# the runners

@contextlib.contextmanager
def hub_for_page(root: Path, monkeypatch):
    """An embedded Hub; calls without ``endpoint=`` reach it (the constants docs/hub_server.md patches)."""
    import huggingface_hub.constants as c

    from hf_taskarith.hub.server import embedded_hub
    with embedded_hub(root) as url:
        monkeypatch.setattr(c, "ENDPOINT", url)
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        yield url


def check_signatures(block: Block, ns: dict) -> int:
    """Each ``name(params) -> Ret`` entry must match ``inspect.signature`` of the real callable."""
    checked = 0
    for stmt in _statements(block.code):
        call, arrow, _ = stmt.partition("->")
        if not arrow:   # a call shown for reference: the callee must exist
            eval(compile(ast.Expression(ast.parse(call.strip(), mode="eval").body.func), str(block), "eval"), ns)
            continue
        name = call.strip().split("(", 1)[0]
        shown = ast.parse(f"def {call.strip()}: ...").body[0].args
        real = inspect.signature(eval(name, ns))
        shown_names = [a.arg for a in shown.posonlyargs + shown.args] + [a.arg for a in shown.kwonlyargs]
        assert shown_names == list(real.parameters), f"{block}: {name} shows {shown_names}, is {list(real.parameters)}"
        defaults = dict(zip([a.arg for a in shown.kwonlyargs], shown.kw_defaults))
        for arg, node in defaults.items():
            if node is not None:
                assert ast.literal_eval(node) == real.parameters[arg].default, f"{block}: {name}({arg}=...) default"
        checked += 1
    assert checked, f"{block} is marked signature but shows none"
    return checked


def _statements(code: str) -> list[str]:
    """Logical lines (continuations joined), comments dropped."""
    out, cur, depth = [], "", 0
    for line in code.splitlines():
        line = line.split("  #")[0].rstrip()
        if not line.strip():
            continue
        cur += " " + line.strip()
        depth += line.count("(") + line.count("[") - line.count(")") - line.count("]")
        if depth <= 0:
            out.append(cur.strip())
            cur, depth = "", 0
    return out


def run_python_page(page: str, tmp_path: Path, monkeypatch) -> list[str]:
    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "ENDPOINT", c.ENDPOINT)   # a block may patch them (hub_server.md): restored after
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", c.HUGGINGFACE_CO_URL_TEMPLATE)
    ns: dict = {"__name__": f"doc_{Path(page).stem}"}
    GIVENS.get(page, lambda ns: None)(ns)
    skipped = []
    blocks = [b for b in ALL_BLOCKS if b.page == page and b.lang == "python"]
    hub = hub_for_page(tmp_path / "hub-for-test", monkeypatch) if page in HUB_PAGES else contextlib.nullcontext()
    with hub as url:
        ns["url"] = url
        for b in blocks:
            if b.mark == "skip":
                skipped.append(f"{b}: {b.reason}")
            elif b.mark == "signature":
                check_signatures(b, ns)
            else:
                try:
                    exec(compile(b.code, str(b), "exec"), ns)
                except Exception as e:
                    raise AssertionError(f"{b} failed: {type(e).__name__}: {e}\n--- block ---\n{b.code}") from e
    return skipped


PY_PAGES = sorted({b.page for b in ALL_BLOCKS if b.lang == "python"})


@pytest.mark.parametrize("page", PY_PAGES)
def test_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    skipped = run_python_page(page, tmp_path, monkeypatch)
    with capsys.disabled():
        for s in skipped:
            print(f"\n[doc-test skipped] {s}")


# ---------------------------------------------------------------------------------------------
# shell blocks: the lines that call hf-taskarith

_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")


def shell_statements(code: str) -> list[str]:
    """Lines with backslash continuations joined."""
    out, cur = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
        else:
            out.append(cur + line)
            cur = ""
    return out


def is_synopsis(line: str) -> bool:
    words = shlex.split(line.split(" #")[0])   # a quoted "train[:90%]" is an argument, not an optional part
    return any(w.startswith("[") or _PLACEHOLDER.match(w) for w in words[1:])


def _has_option(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def _help(command: list[str], where: str) -> str:
    from hf_taskarith.cli.main import main

    buf = __import__("io").StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code in (0, None), f"{where}: hf-taskarith {' '.join(command)} --help failed"
    return buf.getvalue()


def check_synopsis(line: str, where: str) -> None:
    """Every ``--option`` a synopsis line shows must be in ``hf-taskarith COMMAND --help``; for the
    ``COMMAND`` placeholder itself, the options its comment names must be in every command's help."""
    from hf_taskarith.cli.main import COMMANDS

    words = line.split("#")[0].split()
    if words[1:2] == ["COMMAND"]:
        note = line.split("#", 1)[1] if "#" in line else ""
        for cmd in COMMANDS:
            text = _help(["hub", "serve"] if cmd == "hub" else [cmd], where)
            lacking = [o for o in re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", note) if not _has_option(text, o)]
            assert not lacking, f"{where}: the comment says every command takes {lacking}; `{cmd}` does not"
        return
    command = []
    for w in words[1:]:
        if w.startswith(("-", "[")) or _PLACEHOLDER.match(w):
            break
        command.append(w)
    text = _help(command, where)
    missing = [o for o in re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", line.split("#")[0]) if not _has_option(text, o)]
    assert not missing, (f"{where}: {line.strip()!r} shows options that `hf-taskarith {' '.join(command)} --help` "
                         f"lacks: {missing}")
    note = line.split("#", 1)[1] if "#" in line else ""
    for o in re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", note):   # options named in the comment exist too
        assert _has_option(text, o), f"{where}: the comment names {o}, which `hf-taskarith {' '.join(command)}` lacks"


def _shell_given(page: str, tmp_path: Path) -> None:
    from hf_taskarith import TaskVector
    if page in ("docs/hub.md", "docs/hub_server.md"):
        base = tiny_llama()
        TaskVector.from_models(base, perturbed(base, 1)).save_pretrained("tv" if page == "docs/hub.md" else "my_tv")
    if page == "docs/linearized.md":
        folder = Path("sentence-transformers/all-MiniLM-L6-v2")
        bert_cls(num_labels=2).save_pretrained(folder)
        save_tokenizer(folder)
        rows = [f"{w} {n},{int(w in ('good', 'great'))}" for w in ("good", "bad", "great", "awful")
                for n in ("film", "food")]
        Path("reviews.csv").write_text("text,label\n" + "\n".join(rows * 3) + "\n")


def runnable_script(stmts: list[str]) -> str:
    """The block as a bash script: a ``hub serve`` line runs in the background until the script ends."""
    lines = ["set -euo pipefail"]
    for s in stmts:
        if re.match(r"\s*hf-taskarith hub serve\b", s):
            port = re.search(r"--port (\d+)", s).group(1)
            root = re.search(r"--root (\S+)", s).group(1)
            lines += [s.split("#")[0] + " > serve.log 2>&1 &", "SERVER=$!", "trap 'kill $SERVER' EXIT",
                      f"for i in $(seq 300); do [ -s {root}/.hub-token ] && (exec 3<>/dev/tcp/127.0.0.1/{port}) "
                      "2>/dev/null && break; sleep 0.1; done",
                      "kill -0 $SERVER  # still running: it bound the port (not another process)"]
        else:
            lines.append(s)
    return "\n".join(lines) + "\n"


SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang != "python" and "hf-taskarith" in b.code]


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=str)
def test_shell_lines_run(block, tmp_path, monkeypatch):
    if block.mark == "skip":
        pytest.skip(block.reason)
    stmts = shell_statements(block.code)
    calls = [s for s in stmts if s.strip().startswith("hf-taskarith")]
    for s in calls:
        if is_synopsis(s):
            check_synopsis(s, str(block))
    concrete = [s for s in calls if not is_synopsis(s)]
    if not concrete:
        return
    monkeypatch.chdir(tmp_path)
    _shell_given(block.page, tmp_path)
    script = runnable_script([s for s in stmts if not (s.strip().startswith("hf-taskarith") and is_synopsis(s))])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)   # blocks talk to a loopback Hub only: HF_ENDPOINT is never huggingface.co
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = (tmp_path / "serve.log").read_text() if (tmp_path / "serve.log").exists() else ""
    assert proc.returncode == 0, (f"{block} failed ({proc.returncode}):\n{script}\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}\n{log[-2000:]}")
    for s in concrete:   # what each command promises in its comment, checked on disk
        for out in re.findall(r"> (\S+)", s.split("#")[0]):
            assert (tmp_path / out).stat().st_size > 0, f"{block}: {s!r} wrote nothing to {out}"


def test_skipped_blocks_are_few_and_say_why(capsys):
    skipped = [b for b in ALL_BLOCKS if b.mark == "skip"]
    with capsys.disabled():
        print(f"\n[doc-test] {len(ALL_BLOCKS)} code blocks, {len(skipped)} skipped:")
        for b in skipped:
            print(f"[doc-test]   {b}: {b.reason}")
        others = [b for b in ALL_BLOCKS if b.lang != "python" and b not in SHELL_BLOCKS]
        print(f"[doc-test] {len(others)} shell blocks call no hf-taskarith (scripts, benchmarks; not run here): "
              + ", ".join(map(str, others)))
    assert all(b.reason.strip() for b in skipped), "a skip mark must give its reason: <!-- doc-test: skip (why) -->"
    assert len(skipped) <= MAX_SKIPPED, f"{len(skipped)} skipped doc blocks (cap {MAX_SKIPPED})"
    assert len(PY_PAGES) >= 8 and len(SHELL_BLOCKS) >= 7, "the block extraction found too little"
