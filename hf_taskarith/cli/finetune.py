"""``hf-taskarith finetune``: fine-tune a text classifier with the Trainer and save its task vector.

In the style of ``trl sft``: the command's own options name the model, the data and the mode;
every other option is a ``transformers.TrainingArguments`` field, parsed by
``transformers.HfArgumentParser`` (``--learning_rate 1e-4 --num_train_epochs 3 --bf16``, also
spelled ``--learning-rate``). ``--output-dir`` is ``TrainingArguments.output_dir``.

Modes, all trained by :class:`~hf_taskarith.training.LinearizedTrainer`:

* ``linear``: the whole model in its tangent space (``LinearizedModel``);
* ``nonlinear``: ordinary fine-tuning (the same trainer, ``mode="nonlinear"``);
* ``llora``: an L-LoRA adapter (``peft.get_peft_model`` with
  :class:`~hf_taskarith.adapters.LinearizedLoraConfig`, ``task_type="SEQ_CLS"``; the classifier
  is trained in full as a ``modules_to_save`` entry). Its task vector is the dense one of
  ``TaskVector.from_peft``.

Outputs, under ``--output-dir``: ``task_vector/`` (``TaskVector.from_pretrained``) with the
training settings, labels and metrics in ``metadata.extra["training"]``; and ``base/`` when
the model got newly initialised weights (a plain encoder's classification head, or a head of
another size): the model as training started, with its head and label names, which is the
vector's recorded base, since the id it came from does not load those weights. The Trainer's
checkpoints (``save_strategy``) go to ``checkpoint-N/`` as usual.

Note:
    Meant to run under ``accelerate launch`` / ``torchrun`` as well: every process loads the
    data and the model (seeded with ``--seed``, so a new head is the same on every rank);
    tokenization runs on the main process first, the others reuse its cache; every process
    computes the task vector (a collective under FSDP); only the world's process zero writes
    ``base/`` and ``task_vector/``, prints and pushes. ``average_tokens_across_devices``
    defaults to ``False`` here (pass it to override): with transformers' default, the
    Trainer multiplies a loss by the process count, which is wrong for the mean losses of
    sequence classifiers (the ordinary step was 2x with two processes). Tested: two gloo CPU
    processes under ``accelerate launch`` take the single-process step
    (``tests/test_cli_finetune.py``, ``nonlinear``; ``linear`` and ``llora`` checked by hand
    the same way). Not run: GPUs, several machines, FSDP, DeepSpeed.

Example::

    hf-taskarith finetune --model sentence-transformers/all-MiniLM-L6-v2 --dataset reviews.csv \\
        --split "train[:90%]" --eval-split "train[90%:]" --mode linear --output-dir out \\
        --learning_rate 1e-4 --num_train_epochs 2 --per_device_train_batch_size 32
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import DatasetError

logger = logging.getLogger(__name__)

MODES = ("linear", "nonlinear", "llora")
TASK_VECTOR_DIR = "task_vector"
BASE_DIR = "base"
_TRAINING_ARGUMENTS_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"


class _UsageError(Exception):
    """Options that do not fit together; reported like argparse's errors (exit status 2)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a text classifier (linear, nonlinear or L-LoRA) and save its task vector",
        description="Fine-tune a sequence classifier on a text dataset with the transformers Trainer, in the "
                    "tangent space (linear), ordinarily (nonlinear) or with an L-LoRA adapter (llora), and write "
                    "the task vector to OUTPUT_DIR/task_vector (optionally pushing it to the Hub). Labels may be "
                    "names or integer ids. Every transformers.TrainingArguments option is accepted too (see below). "
                    "Works under `accelerate launch`.",
        epilog="Training options: any other option is a transformers.TrainingArguments field, spelled "
               "--name VALUE or --name-with-dashes VALUE, e.g. --learning_rate 1e-4 --num_train_epochs 3 "
               "--per_device_train_batch_size 16 --bf16 --seed 1 --report_to none --use_cpu (all of them: "
               "the transformers documentation of TrainingArguments).",
        allow_abbrev=False)  # an abbreviation must not swallow a TrainingArguments flag
    data = p.add_argument_group("model and data")
    data.add_argument("--model", required=True, metavar="PATH_OR_ID",
                      help="pre-trained model folder or Hub id (AutoModelForSequenceClassification; a new "
                           "classification head is added if it has none)")
    data.add_argument("--tokenizer", metavar="PATH_OR_ID", help="tokenizer folder or Hub id (default: --model)")
    data.add_argument("--dataset", required=True, metavar="PATH_OR_ID",
                      help="a .csv/.tsv/.json/.jsonl/.parquet file, a folder of such files or one written by "
                           "save_to_disk, or a Hub dataset id")
    data.add_argument("--dataset-config", metavar="NAME", help="configuration of a Hub dataset (e.g. sst2 of glue)")
    data.add_argument("--split", default="train",
                      help="training split; slices work except for save_to_disk folders, e.g. 'train[:90%%]'")
    data.add_argument("--eval-split", metavar="SPLIT",
                      help="split to evaluate on after training (accuracy is printed and stored with the task "
                           "vector), e.g. test or 'train[90%%:]'")
    data.add_argument("--text-column", default="text", metavar="COLUMN", help="column holding the text")
    data.add_argument("--text-pair-column", metavar="COLUMN",
                      help="column holding a second text (sentence-pair tasks such as NLI)")
    data.add_argument("--label-column", default="label", metavar="COLUMN",
                      help="column holding the labels: class names or integer ids (sorted to give ids)")
    data.add_argument("--max-length", type=_positive_int, metavar="N",
                      help="truncate inputs to this many tokens (default: the tokenizer's limit, at most the "
                           "model's max_position_embeddings)")
    train = p.add_argument_group("training")
    train.add_argument("--mode", default="linear", choices=MODES,
                       help="linear: tangent-space fine-tuning; nonlinear: ordinary fine-tuning; llora: an L-LoRA "
                            "adapter (linearized LoRA), turned into a dense task vector")
    train.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, metavar="DIR",
                       help="where the task vector (DIR/task_vector), the base with a new head (DIR/base) and "
                            "the Trainer's checkpoints go; TrainingArguments.output_dir")
    train.add_argument("--overwrite", action="store_true",
                       help="replace DIR/task_vector and DIR/base if they exist (checked before training)")
    lora = p.add_argument_group("L-LoRA (--mode llora)")
    lora.add_argument("--lora-r", type=_positive_int, default=8, metavar="R", help="rank of the adapter")
    lora.add_argument("--lora-alpha", type=float, default=8.0, metavar="ALPHA", help="scaling = lora_alpha / r")
    lora.add_argument("--lora-target-modules", nargs="+", metavar="NAME",
                      help="module names (or suffixes) to adapt (default: peft's LoRA defaults for the model "
                           "type, e.g. query value for BERT)")
    lora.add_argument("--lora-linearization", default="model", choices=("model", "layer"),
                      help="model: the network is linearized in the adapter (Tang et al.); layer: only each LoRA "
                           "branch (cheaper)")
    hub = p.add_argument_group("Hub")
    hub.add_argument("--push-to", metavar="REPO_ID",
                     help="push the task vector to this Hub repo in one commit (token and privacy from "
                          "--hub_token / --hub_private_repo)")
    hub.add_argument("--tag", help="tag the pushed commit, e.g. v1 (needs --push-to)")
    own = [s for action in p._actions for s in action.option_strings]
    p.set_defaults(func=run, accepts_training_args=True, finetune_options=own)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _UsageError as e:
        print(f"hf-taskarith finetune: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import datasets

    from ..io.atomic import check_output_path

    if args.tag and not args.push_to:
        raise _UsageError(f"--tag {args.tag} tags a pushed commit; add --push-to REPO_ID, or drop --tag.")
    training_args = parse_training_args(getattr(args, "training_args", []), output_dir=args.output_dir,
                                        no_progress=args.no_progress, own_options=args.finetune_options)
    out = Path(args.output_dir)
    # every process checks before any process writes (the main process writes base/ only after the
    # tokenization barrier below, which every process reaches after this check)
    check_output_path(out / TASK_VECTOR_DIR, overwrite=args.overwrite)
    check_output_path(out / BASE_DIR, overwrite=args.overwrite)
    if training_args.push_to_hub:
        logger.warning("--push_to_hub makes the Trainer upload its checkpoints; the task vector is pushed "
                       "by --push-to REPO_ID.")

    with _datasets_progress(enabled=not args.no_progress):
        train_ds, eval_ds, labels = _load_data(args)
        fixed = isinstance(train_ds.features[args.label_column], datasets.ClassLabel)  # ids given by the data
        tokenizer, config, label_ids = _load_tokenizer_and_config(args, labels, reorder=not fixed)
        max_length = args.max_length or _default_max_length(tokenizer, config)
        from ..training.data import tokenize_for_classification

        encode = {"tokenizer": tokenizer, "text_column": args.text_column, "labels": label_ids,
                  "text_pair_column": args.text_pair_column, "label_column": args.label_column,
                  "max_length": max_length}
        with training_args.main_process_first(desc="tokenizing"):
            train_ds = tokenize_for_classification(train_ds, **encode)
            eval_ds = tokenize_for_classification(eval_ds, **encode) if eval_ds is not None else None

    model, base_saved = _load_model(args, config, tokenizer, training_args)
    trainer = _build_trainer(args, model, tokenizer, training_args, train_ds, eval_ds)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate() if eval_ds is not None else {}
    tv = trainer.task_vector(mode=args.mode, dataset=args.dataset, dataset_config=args.dataset_config,
                             split=args.split, eval_split=args.eval_split, text_column=args.text_column,
                             text_pair_column=args.text_pair_column, label_column=args.label_column,
                             labels=[config.id2label[i] for i in range(config.num_labels)])
    if not trainer.is_world_process_zero():
        return 0
    tv.save_pretrained(out / TASK_VECTOR_DIR, overwrite=args.overwrite)
    if base_saved:
        print(f"base model with its new classification head written to {out / BASE_DIR} (the task vector's base)")
    print(f"task vector ({len(tv)} tensors, norm {tv.norm():.4g}) written to {out / TASK_VECTOR_DIR}")
    if "eval_accuracy" in metrics:
        print(f"eval accuracy {metrics['eval_accuracy']:.4f} on split {args.eval_split!r} ({len(eval_ds)} examples)")
    if args.push_to:
        _push(tv, args, training_args, base_saved)
    return 0


def parse_training_args(argv: Sequence[str], *, output_dir: str, no_progress: bool = False,
                        own_options: Sequence[str] = ()):
    """``TrainingArguments`` from the options ``finetune`` does not define itself.

    Raises:
        _UsageError: an unknown option (with the closest known spellings), a bad value, or a
            combination ``TrainingArguments`` refuses.
    """
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments, prog="hf-taskarith finetune", exit_on_error=False,
                              allow_abbrev=False)  # strict: --learning_rat is a typo, not --learning_rate
    # One label per example: transformers' sequence-classification losses are plain means that ignore
    # num_items_in_batch, so the Trainer's rescaling by the process count (average_tokens_across_devices)
    # would multiply their gradients by the number of processes (measured: 2x with 2 DDP processes).
    preset = ["--output_dir", output_dir, "--average_tokens_across_devices", "false",
              *(["--disable_tqdm", "true"] if no_progress else [])]
    try:
        training_args, unknown = parser.parse_args_into_dataclasses(args=[*preset, *argv],
                                                                    return_remaining_strings=True)
    except argparse.ArgumentError as e:
        raise _UsageError(f"TrainingArguments option {e}. See {_TRAINING_ARGUMENTS_DOCS}") from None
    except ValueError as e:  # TrainingArguments.__post_init__ refusing a combination
        raise _UsageError(f"TrainingArguments refused the options: {e}") from None
    if unknown:
        known = [*parser._option_string_actions, *own_options]
        hints = []
        for option in (u.split("=")[0] for u in unknown if u.startswith("-")):
            close = difflib.get_close_matches(option, known, n=3, cutoff=0.75)
            if close:
                hints.append(f"{option}: did you mean {' or '.join(close)}?")
        raise _UsageError(f"unrecognized arguments: {' '.join(unknown)}. Options are this command's own "
                          f"(hf-taskarith finetune --help) or TrainingArguments fields ({_TRAINING_ARGUMENTS_DOCS})."
                          + (" " + " ".join(hints) if hints else ""))
    return training_args


# -- data, tokenizer, model ---------------------------------------------------------------------
def _load_data(args: argparse.Namespace):
    from ..training.data import check_columns, class_labels, load_split

    train_ds = load_split(args.dataset, args.split, config_name=args.dataset_config)
    eval_ds = load_split(args.dataset, args.eval_split, config_name=args.dataset_config) if args.eval_split else None
    columns = {"--text-column": args.text_column, "--text-pair-column": args.text_pair_column,
               "--label-column": args.label_column}
    text = ["--text-column"] + (["--text-pair-column"] if args.text_pair_column else [])
    for ds, split in ((train_ds, args.split), (eval_ds, args.eval_split)):
        if ds is not None:
            check_columns(ds, columns, text=text, source=f"split {split!r} of dataset {args.dataset!r}")
    labels = class_labels(train_ds, *([eval_ds] if eval_ds is not None else []), column=args.label_column)
    if len(labels) < 2:
        raise DatasetError(f"column {args.label_column!r} of split {args.split!r} holds one class ({labels}); "
                           "classification needs at least two. Check --label-column and --split.")
    return train_ds, eval_ds, labels


def _load_tokenizer_and_config(args: argparse.Namespace, labels: list[Any], *, reorder: bool):
    """The tokenizer (with a pad token), and the model config with the dataset's labels.

    Returns ``(tokenizer, config, labels)``: with ``reorder``, ``labels`` are put in the order
    of the model's own label ids when the model is already a classifier of exactly these
    classes (so its head keeps its meaning); otherwise they stay as given.
    """
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise _UsageError(f"the tokenizer of {args.tokenizer or args.model!r} has neither a pad nor an eos token "
                              "to pad batches with; pass --tokenizer with one that has.")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no pad token; padding with its eos token %r", tokenizer.eos_token)
    config = AutoConfig.from_pretrained(args.model)
    names = [str(v) for v in labels]
    own = {str(k): int(v) for k, v in (config.label2id or {}).items()}
    if reorder and sorted(own) == sorted(names) and sorted(own.values()) == list(range(len(names))):
        by_name = dict(zip(names, labels))
        labels = [by_name[name] for name in sorted(own, key=own.get)]
        names = [str(v) for v in labels]
    elif own != {name: i for i, name in enumerate(names)} and not all(k.startswith("LABEL_") for k in own):
        logger.warning("%s is a classifier of %s; the dataset's classes %s replace them", args.model,
                       sorted(own, key=own.get), names)
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, config, labels


def _default_max_length(tokenizer: Any, config: Any) -> int | None:
    limits = [n for n in (tokenizer.model_max_length, getattr(config, "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None


def _load_model(args: argparse.Namespace, config: Any, tokenizer: Any, training_args: Any):
    """The classifier, seeded so that new weights are the same on every process.

    When weights were newly initialised, the main process saves the model as it is to
    ``OUTPUT_DIR/base`` and every process records that folder as the model's id, so the task
    vector names a base that reproduces its weights. Returns ``(model, base_saved)``.
    """
    from transformers import AutoModelForSequenceClassification, set_seed

    from ..io.atomic import atomic_output_dir

    set_seed(training_args.seed)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        args.model, config=config, ignore_mismatched_sizes=True, output_loading_info=True)
    fresh = sorted({k if isinstance(k, str) else k[0] for key in ("missing_keys", "mismatched_keys")
                    for k in info.get(key, ())})
    if not fresh:
        return model, False
    base_dir = (Path(args.output_dir) / BASE_DIR).absolute()
    logger.info("newly initialised: %s; the base with these weights is saved to %s", fresh, base_dir)
    if training_args.process_index == 0:
        with atomic_output_dir(base_dir, overwrite=args.overwrite) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    model.config._name_or_path = str(base_dir)
    model.config._commit_hash = None
    model.name_or_path = str(base_dir)
    return model, True


def _build_trainer(args: argparse.Namespace, model: Any, tokenizer: Any, training_args: Any, train_ds: Any,
                   eval_ds: Any):
    from transformers import DataCollatorWithPadding, PrinterCallback

    from ..training.trainer import LinearizedTrainer

    mode, linearize_kwargs = args.mode, {"copy_model": False}  # the CLI keeps no other reference to the model
    if args.mode == "llora":
        import peft

        from ..adapters import LinearizedLoraConfig

        lora = LinearizedLoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_target_modules,
                                    linearization=args.lora_linearization, init_seed=training_args.seed,
                                    task_type="SEQ_CLS")
        model = peft.get_peft_model(model, lora)
        mode, linearize_kwargs = "linear", None  # LinearizedTrainer trains a linearized adapter as it is
    trainer = LinearizedTrainer(model=model, args=training_args, mode=mode, linearize_kwargs=linearize_kwargs,
                                train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                                data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=_accuracy)
    if args.quiet:
        trainer.remove_callback(PrinterCallback)
    return trainer


def _accuracy(eval_pred: Any) -> dict[str, float]:
    import numpy as np

    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_pred.label_ids).mean())}


def _push(tv: Any, args: argparse.Namespace, training_args: Any, base_saved: bool) -> None:
    from ..hub.push import push_task_vector

    if base_saved:
        logger.warning("the task vector's base is the local folder %s (the model with its new head); upload it "
                       "too (e.g. `hf upload ORG/NAME %s`) so that others can apply the vector.",
                       Path(args.output_dir) / BASE_DIR, Path(args.output_dir) / BASE_DIR)
    res = push_task_vector(tv, args.push_to, tag=args.tag, token=training_args.hub_token,
                           private=bool(training_args.hub_private_repo))
    print(f"pushed {args.push_to}@{res.branch}: commit {res.commit_sha}" + (f", tag {res.tag}" if res.tag else ""))


@contextlib.contextmanager
def _datasets_progress(*, enabled: bool) -> Iterator[None]:
    """``datasets``' progress bars off while loading and tokenizing when ``enabled`` is False (restored after)."""
    from datasets.utils import logging as datasets_logging

    if enabled or not datasets_logging.is_progress_bar_enabled():
        yield
        return
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        datasets_logging.enable_progress_bar()
