"""Text-classification data for the Trainer: load a split, check its columns, map labels to ids, tokenize.

These are the steps ``hf-taskarith finetune`` runs before training; a Trainer script can use
them the same way::

    >>> train = load_split("reviews.csv", "train[:90%]")
    >>> labels = class_labels(train, "label")                   # e.g. ['neg', 'pos']
    >>> train = tokenize_for_classification(train, tokenizer, text_column="text", labels=labels,
    ...                                     label_column="label", max_length=128)

Sources (:func:`load_split`): a CSV/TSV/JSON/JSONL/Parquet file, a folder of such files, a
folder written by ``Dataset.save_to_disk``, or a Hub dataset id. Errors are
:class:`~hf_taskarith.errors.DatasetError` and say what was received, what was expected and
the fix.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DatasetError, format_names

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

#: file suffix -> (``datasets`` builder, builder keyword arguments)
FILE_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}), ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what Dataset(Dict).save_to_disk writes
_TEXT_DTYPES = ("string", "large_string")


def load_split(source: str | os.PathLike, split: str = "train", *, config_name: str | None = None) -> datasets.Dataset:
    """One split of a dataset, from a local file or folder or from the Hub.

    Args:
        source: a ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file (one split, ``train``),
            a folder of such files, a folder written by ``save_to_disk``, or a Hub dataset id.
        split: the split name; except for ``save_to_disk`` folders, ``datasets`` slicing works
            too (``"train[:90%]"``, ``"train[90%:]"``), which holds out part of a single file.
        config_name: the configuration of a Hub dataset (``"sst2"`` of ``glue``).

    Returns:
        A ``datasets.Dataset``.

    Raises:
        DatasetError: the source does not exist, has an unsupported suffix, cannot be reached,
            or has no such split (the message lists the splits it has).
    """
    import datasets

    path = Path(source)
    if path.is_file():
        builder, kwargs = _builder_for(path)
        return _load(str(source), split, builder, data_files=str(path), **kwargs)
    if path.is_dir():
        if any((path / name).is_file() for name in _SAVED_MARKERS):
            return _from_disk(path, split)
        return _load(str(source), split, str(path))
    if path.suffix.lower() in FILE_BUILDERS or str(source).startswith((".", "/", "~")):
        raise DatasetError(f"dataset {str(source)!r}: no such file or folder. Check the path (a local file must "
                           f"end in one of {', '.join(FILE_BUILDERS)}).")
    try:
        return _load(str(source), split, str(source), name=config_name)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DatasetError(f"dataset {str(source)!r}: not a local file or folder, and not found on the Hub ({e}). "
                           "Check the path or the dataset id.") from None


def _builder_for(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        return FILE_BUILDERS[path.suffix.lower()]
    except KeyError:
        raise DatasetError(f"dataset file {str(path)!r}: unsupported suffix {path.suffix!r}; expected one of "
                           f"{', '.join(FILE_BUILDERS)}. Convert the file, or save it with Dataset.save_to_disk "
                           "and pass that folder.") from None


def _load(label: str, split: str, *args: Any, **kwargs: Any) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(*args, split=split, **kwargs)
    except ValueError as e:
        if "split" not in str(e).lower():
            raise
        raise DatasetError(f"dataset {label!r} has no split {split!r} ({e}). A single file holds one split, "
                           "'train'; hold out part of it with slicing, e.g. 'train[:90%]' and 'train[90%:]'.") from None
    except (ConnectionError, FileNotFoundError) as e:
        raise DatasetError(f"dataset {label!r} could not be loaded: {e}. A local file or folder must exist; a Hub "
                           "dataset needs a network connection (or a cached copy with HF_HUB_OFFLINE=1).") from None


def _from_disk(path: Path, split: str) -> datasets.Dataset:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"dataset {str(path)!r} (saved with save_to_disk) has no split {split!r}; it has "
                               f"{sorted(loaded)}. Slicing ('train[:90%]') is not supported for saved datasets: "
                               "save the split you want with save_to_disk.")
        return loaded[split]
    if split != "train":
        raise DatasetError(f"dataset {str(path)!r} is a single saved Dataset (one split, used as 'train'); got split "
                           f"{split!r}. Save a DatasetDict with the splits you need.")
    return loaded


def check_columns(dataset: datasets.Dataset, columns: Mapping[str, str | None], *, text: Collection[str] = (),
                  source: str = "the dataset") -> None:
    """Check that ``dataset`` has the named columns, and that the text ones hold strings.

    Args:
        dataset: the split to check.
        columns: how the caller names each column (``"--text-column"``, ``"label_column"``) ->
            the column name; ``None`` values are skipped.
        text: the keys of ``columns`` that must hold strings.
        source: the dataset and split, for messages.

    Raises:
        DatasetError: a column is missing (the message lists the columns there are), or a
            text column does not hold strings.
    """
    present = list(dataset.column_names)
    for role, name in columns.items():
        if name is not None and name not in present:
            raise DatasetError(f"{source} has no column {name!r} ({role}); its columns are {present}. Pass the "
                               f"one that holds the {'text' if role in text else 'labels'} as {role}.")
    for role in text:
        name = columns.get(role)
        dtype = getattr(dataset.features[name], "dtype", None) if name is not None else "string"
        if dtype not in _TEXT_DTYPES:
            raise DatasetError(f"{source}: column {name!r} ({role}) holds "
                               f"{dtype or type(dataset.features[name]).__name__} values; expected strings. Pass the "
                               f"column that holds the text as {role}.")


def class_labels(*splits: datasets.Dataset, column: str) -> list[Any]:
    """The classes of ``column``, in id order: a ``ClassLabel``'s names, else the sorted distinct values.

    Every split after the first must use only classes of the first (the training split).

    Raises:
        DatasetError: missing labels, real-valued labels (regression is not supported), mixed
            types, or labels in a later split that the first has not.
    """
    import datasets

    first, *rest = splits
    feature = first.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    classes = _distinct(first[column], column)
    for other in rest:
        if isinstance(other.features[column], datasets.ClassLabel):
            raise DatasetError(f"column {column!r} is a ClassLabel in one split and plain values in another; use "
                               "the same feature type in every split.")
        unseen = sorted(set(_distinct(other[column], column)) - set(classes), key=repr)
        if unseen:
            raise DatasetError(f"labels {format_names(unseen)} of the evaluation split do not occur in the training "
                               f"split (its labels: {format_names(classes)}). Every class needs training examples.")
    return classes


def _distinct(values: Sequence[Any], column: str) -> list[Any]:
    missing = sum(v is None for v in values)
    if missing:
        raise DatasetError(f"label column {column!r} has {missing} empty value(s); every example needs a label. "
                           "Drop those rows or fill them in.")
    found = set(values)
    real = [v for v in found if isinstance(v, float) and not (math.isfinite(v) and v.is_integer())]
    if real:
        raise DatasetError(f"label column {column!r} holds real numbers (e.g. {real[0]!r}); expected class "
                           "names or integer ids (regression is not supported). Bin the values into classes.")
    kinds = {str if isinstance(v, str) else numbers.Integral if isinstance(v, numbers.Real) else type(v)
             for v in found}
    if len(kinds) > 1 or not kinds <= {str, numbers.Integral}:
        raise DatasetError(f"label column {column!r} mixes or uses unsupported value types "
                           f"({sorted(t.__name__ for t in kinds)}); expected all strings or all integers.")
    if kinds == {numbers.Integral}:
        return sorted(int(v) for v in found)
    return sorted(found)


def tokenize_for_classification(dataset: datasets.Dataset, tokenizer: Any, *, text_column: str, labels: Sequence[Any],
                                label_column: str, text_pair_column: str | None = None,
                                max_length: int | None = None) -> datasets.Dataset:
    """Tokenized inputs (truncated to ``max_length``, not padded) and ``labels`` as class ids.

    Other columns are removed. A ``ClassLabel`` column keeps its ids; other labels are
    mapped through their position in ``labels`` (as returned by :func:`class_labels`).
    """
    import datasets

    keep_ids = isinstance(dataset.features[label_column], datasets.ClassLabel)
    to_id = {v: i for i, v in enumerate(labels)}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        pair = batch[text_pair_column] if text_pair_column else None
        out = tokenizer(batch[text_column], pair, truncation=True, max_length=max_length)
        values = batch[label_column]
        out["labels"] = list(values) if keep_ids else [to_id[int(v) if isinstance(v, float) else v] for v in values]
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
