"""Regressions found while writing docs/hub.md and docs/evaluation.md."""

from __future__ import annotations

import pytest
import torch

from hf_taskarith import CheckpointNotFoundError, TaskVector
from hf_taskarith.evaluation import DisentanglementGrid
from hf_taskarith.evaluation.coefficients import layer_of


@pytest.mark.parametrize("path", ["./typo-dir", "/no/such/folder/tv", "~/tv"])
def test_from_pretrained_missing_local_path_is_not_sent_to_the_hub(path):
    with pytest.raises(CheckpointNotFoundError, match="no such folder, and not a Hub repo id"):
        TaskVector.from_pretrained(path)


def test_hub_server_accepts_a_relative_root(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from hf_taskarith.hub.server import embedded_hub

    monkeypatch.chdir(tmp_path)
    with embedded_hub("hub") as url:  # relative to the working directory, as `hub serve --root hub` passes it
        api = HfApi(endpoint=url)
        api.create_repo("team/tv")
        api.upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id="team/tv")
        assert "a.txt" in api.list_repo_files("team/tv")
    assert (tmp_path / "hub" / "models" / "team" / "tv" / ".git" / "HEAD").is_file()


@pytest.mark.parametrize("name, layer", [
    ("encoder.layer.3.attention.self.query.weight", "encoder.layer.3"),
    ("model.layers.7.mlp.up_proj.weight", "model.layers.7"),
    ("blocks.5.attn.qkv.weight", "blocks.5"),  # block container at the top level
    ("layers.0.weight", "layers.0"),
    ("embeddings.word_embeddings.weight", "embeddings"),
    ("trunk.0.weight", "trunk"),
])
def test_layer_of(name, layer):
    assert layer_of(name) == layer


def test_disentanglement_plot_centres_cells_on_alphas(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from hf_taskarith.evaluation import plots

    grid = DisentanglementGrid(("a", "b"), (0.0, 0.5, 1.0), torch.zeros(3, 3))
    seen = {}
    real_savefig = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):
        seen["extent"] = fig.axes[0].images[0].get_extent()
        return real_savefig(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", savefig)
        plots.plot_disentanglement(grid, tmp_path / "xi.png")
    assert seen["extent"] == pytest.approx([-0.25, 1.25, -0.25, 1.25])


def test_the_linearized_step_cost_is_quoted_in_one_place():
    """Measured step-cost ratios live in docs/linearized.md (*Cost, measured*); the package, README
    and other docs point there instead of quoting their own (they used to disagree: 1.64x, 1.68x,
    ~1.85x, ~1.7x)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"\d\.\d+x\s+(?:an?\s+)?(?:ordinary|LoRA)\s+step|~\s*\d\.\d+x")
    files = [*root.joinpath("hf_taskarith").rglob("*.py"), root / "README.md",
             *[p for p in root.joinpath("docs").glob("*.md") if p.name != "linearized.md"]]
    quoted = [f"{p.relative_to(root)}: {m.group(0)!r}" for p in files
              for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert not quoted, "step-cost figures quoted outside docs/linearized.md: " + "; ".join(quoted)
