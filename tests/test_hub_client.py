"""push/pull/versions of task vectors against the embedded Hub server over real HTTP."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

pytest.importorskip("hf_taskarith.hub.server")
from hf_taskarith import (  # noqa: E402
    ConcurrentPushError,
    HubError,
    NotATaskVectorRepoError,
    TaskVector,
    list_task_vector_versions,
    pull_task_vector,
    push_task_vector,
)
from hf_taskarith.cli.main import main  # noqa: E402
from hf_taskarith.hub.server import serve_in_thread  # noqa: E402

TOKEN = "secret-token"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("hub")
    with serve_in_thread(root, token=TOKEN) as url:
        monkeypatch_module.setenv("HF_ENDPOINT", url)
        monkeypatch_module.setenv("HF_TOKEN", TOKEN)
        monkeypatch_module.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch_module.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch_module.setenv("HF_HOME", str(tmp_path_factory.mktemp("hfhome")))
        import huggingface_hub.constants as c

        monkeypatch_module.setattr(c, "HF_HUB_OFFLINE", False)
        monkeypatch_module.setattr(c, "ENDPOINT", url)
        monkeypatch_module.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        if hasattr(c, "HF_HUB_DISABLE_XET"):
            monkeypatch_module.setattr(c, "HF_HUB_DISABLE_XET", True)
        yield url


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def vectors(llama_models):
    base, fts = llama_models
    return base, [TaskVector.from_models(base, f, base_model="org/tiny-llama", base_revision="main") for f in fts]


def test_push_versions_pull_by_tag(hub, vectors):
    base, (tv1, tv2, _) = vectors
    r1 = push_task_vector(tv1, "team/tv-chat", tag="v1", endpoint=hub, token=TOKEN)
    r2 = tv2.push_to_hub("team/tv-chat", tag="v2", endpoint=hub, token=TOKEN)
    assert r1.commit_sha != r2.commit_sha and r2.revision == "v2"
    got1 = pull_task_vector("team/tv-chat", revision="v1", endpoint=hub, token=TOKEN)
    got2 = pull_task_vector("team/tv-chat", endpoint=hub, token=TOKEN)  # main = latest
    for k in tv1:
        assert torch.equal(got1[k], tv1[k]) and torch.equal(got2[k], tv2[k])
    assert got1.metadata.extra["hub"]["commit_sha"] == r1.commit_sha
    assert got1.metadata.base_fingerprint == tv1.metadata.base_fingerprint
    by_sha = pull_task_vector("team/tv-chat", revision=r1.commit_sha, endpoint=hub, token=TOKEN)
    assert torch.equal(by_sha["model.norm.weight"], tv1["model.norm.weight"])
    half = pull_task_vector("team/tv-chat", revision="v1", endpoint=hub, token=TOKEN, dtype=torch.bfloat16)
    assert half["model.norm.weight"].dtype == torch.bfloat16  # dtype honoured for Hub ids too
    versions = {(v.kind, v.name): v for v in list_task_vector_versions("team/tv-chat", endpoint=hub, token=TOKEN)}
    assert versions[("tag", "v1")].commit_sha == r1.commit_sha and versions[("tag", "v2")].commit_sha == r2.commit_sha
    assert versions[("branch", "main")].commit_sha == r2.commit_sha and versions[("tag", "v1")].date is not None
    with pytest.raises(HubError, match="already exists"):
        push_task_vector(tv1, "team/tv-chat", tag="v1", endpoint=hub, token=TOKEN)
    # pulled vectors apply to the matching base
    edited = got1.apply_to(copy.deepcopy(base))
    assert edited.hf_taskarith_apply_report.fingerprint_ok



def test_a_bare_repo_name_is_pushed_under_the_token_namespace(hub, vectors):
    """As on the Hub: "tv-bare" is created under the user's namespace, and the push goes on with that id."""
    from huggingface_hub import HfApi

    _, (tv1, _, _) = vectors
    user = HfApi(endpoint=hub, token=TOKEN).whoami()["name"]
    r = push_task_vector(tv1, "tv-bare", tag="v1", endpoint=hub, token=TOKEN)
    assert r.repo_id == f"{user}/tv-bare"
    got = pull_task_vector(f"{user}/tv-bare", revision="v1", endpoint=hub, token=TOKEN)
    assert torch.equal(got["model.norm.weight"], tv1["model.norm.weight"])

def test_card_is_pushed_with_metadata(hub, vectors):
    from huggingface_hub import ModelCard

    _, (tv1, _, _) = vectors
    push_task_vector(tv1, "team/tv-card", tag="v1", endpoint=hub, token=TOKEN)
    card = ModelCard.load("team/tv-card", token=TOKEN)
    assert card.data.base_model == "org/tiny-llama" and card.data.base_model_relation == "adapter"
    assert 'revision="v1"' in card.text and "fingerprint" in card.text


def test_branch_push(hub, vectors):
    _, (tv1, tv2, _) = vectors
    push_task_vector(tv1, "team/tv-branch", endpoint=hub, token=TOKEN)
    r = push_task_vector(tv2, "team/tv-branch", branch="experiment", endpoint=hub, token=TOKEN)
    assert r.branch == "experiment"
    main_tv = pull_task_vector("team/tv-branch", endpoint=hub, token=TOKEN)
    exp_tv = pull_task_vector("team/tv-branch", revision="experiment", endpoint=hub, token=TOKEN)
    assert torch.equal(main_tv["model.norm.weight"], tv1["model.norm.weight"])
    assert torch.equal(exp_tv["model.norm.weight"], tv2["model.norm.weight"])


def test_stale_parent_is_refused_and_nothing_lost(hub, vectors):
    _, (tv1, tv2, tv3) = vectors
    r1 = push_task_vector(tv1, "team/tv-race", endpoint=hub, token=TOKEN)
    push_task_vector(tv2, "team/tv-race", endpoint=hub, token=TOKEN, parent_commit=r1.commit_sha)
    with pytest.raises(ConcurrentPushError, match="moved"):
        push_task_vector(tv3, "team/tv-race", endpoint=hub, token=TOKEN, parent_commit=r1.commit_sha)
    latest = pull_task_vector("team/tv-race", endpoint=hub, token=TOKEN)
    assert torch.equal(latest["model.norm.weight"], tv2["model.norm.weight"])


def test_concurrent_pushes_one_wins_cleanly(hub, vectors):
    _, (tv1, tv2, tv3) = vectors
    r0 = push_task_vector(tv1, "team/tv-concurrent", endpoint=hub, token=TOKEN)
    results, errors = [], []

    def push(tv):
        try:
            results.append(push_task_vector(tv, "team/tv-concurrent", endpoint=hub, token=TOKEN,
                                            parent_commit=r0.commit_sha))
        except ConcurrentPushError as e:
            errors.append(e)

    threads = [threading.Thread(target=push, args=(tv,)) for tv in (tv2, tv3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(results) == 1 and len(errors) == 1
    latest = pull_task_vector("team/tv-concurrent", endpoint=hub, token=TOKEN)
    assert latest.metadata.extra["hub"]["commit_sha"] == results[0].commit_sha


def test_compressed_push_pull_decompresses(hub, vectors):
    _, (tv1, _, _) = vectors
    small = tv1.compress("topk", density=0.1)
    push_task_vector(small, "team/tv-small", tag="v1", endpoint=hub, token=TOKEN)
    got = pull_task_vector("team/tv-small", revision="v1", endpoint=hub, token=TOKEN)
    assert got.compressed and got.metadata.extra["compression"]["method"] == "topk"
    for k in tv1:
        assert torch.equal(got[k], small[k])


def test_bad_repos_and_revisions(hub, vectors, llama_checkpoints):
    from huggingface_hub import HfApi

    with pytest.raises(HubError, match="not found"):
        pull_task_vector("team/does-not-exist", endpoint=hub, token=TOKEN)
    _, (tv1, _, _) = vectors
    push_task_vector(tv1, "team/tv-rev", endpoint=hub, token=TOKEN)
    with pytest.raises(HubError, match="revision not found"):
        pull_task_vector("team/tv-rev", revision="v9", endpoint=hub, token=TOKEN)
    api = HfApi(endpoint=hub, token=TOKEN)
    api.create_repo("team/a-model")
    api.upload_folder(repo_id="team/a-model", folder_path=str(llama_checkpoints / "base"))
    with pytest.raises(NotATaskVectorRepoError, match="team/a-model.*task_vector_config.json"):
        pull_task_vector("team/a-model", endpoint=hub, token=TOKEN)


def test_cli_push_versions_pull_apply(hub, vectors, llama_checkpoints, tmp_path, capsys):
    base, (tv1, _, _) = vectors
    tv1.save_pretrained(tmp_path / "tv")
    assert main(["push", str(tmp_path / "tv"), "team/tv-cli", "--tag", "v1", "--endpoint", hub, "--token", TOKEN]) == 0
    assert main(["versions", "team/tv-cli", "--endpoint", hub, "--token", TOKEN]) == 0
    assert "v1" in capsys.readouterr().out
    assert main(["pull", "team/tv-cli", str(tmp_path / "pulled"), "--revision", "v1", "--endpoint", hub,
                 "--token", TOKEN]) == 0
    assert torch.equal(TaskVector.from_pretrained(tmp_path / "pulled")["model.norm.weight"], tv1["model.norm.weight"])
    assert main(["apply", "team/tv-cli", str(llama_checkpoints / "base"), str(tmp_path / "edited"), "--from-hub",
                 "--revision", "v1", "--endpoint", hub, "--token", TOKEN]) == 0
    assert (tmp_path / "edited" / "model.safetensors").is_file()
