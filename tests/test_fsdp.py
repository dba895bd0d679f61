"""LinearizedModel sharded with FSDP2 (``fully_shard``) over two gloo CPU processes (torchrun).

Accelerate enables FSDP only on accelerators (a CPU run falls back to plain multi-process), so
this tests the torch layer that ``Trainer``/accelerate use on GPUs: ``fully_shard`` on the whole
LinearizedModel. One SGD step on a global batch of 8 (4 per rank) must equal a single-process step
on all 8 examples; parameters stay sharded between steps; ``task_vector()`` gathers whole
tensors on every rank; and sharding a layer as its own unit is refused with the fix. The worker
is this file's ``__main__`` block.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_trainer_ddp import LR, N, _free_port, _model_and_data


def worker(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_taskarith.linearize import LinearizedModel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model, ds = _model_and_data()
    batch = {k: torch.tensor(ds[k])[rank * N // 2:(rank + 1) * N // 2]
             for k in ("input_ids", "attention_mask", "labels")}

    bad = LinearizedModel(model)
    fully_shard(bad.model.bert.encoder.layer[0], mesh=mesh)
    fully_shard(bad, mesh=mesh)
    try:
        bad(**batch)
        refusal = None
    except ValueError as e:
        refusal = str(e)

    lin = LinearizedModel(model)
    fully_shard(lin, mesh=mesh)
    opt = torch.optim.SGD([p for p in lin.parameters() if p.requires_grad], lr=LR)
    lin(**batch).loss.backward()
    opt.step()
    shards = {n: (type(p).__name__, tuple(p.to_local().shape), tuple(p.shape))
              for n, p in lin.named_parameters() if n.startswith("delta.")}
    tv = lin.task_vector()
    from hf_taskarith.linearize.storage import is_sharded, trained_weights

    weights = trained_weights(lin)  # what LinearizedTrainer saves; gathered on every rank
    torch.save({"refusal": refusal, "shards": shards, "tv": dict(tv.items()), "weights": weights,
                "sharded": is_sharded(lin),
                "base_fingerprint": tv.metadata.base_fingerprint}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_gloo_processes_match_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(str(p) for p in (Path(__file__).resolve().parents[1], Path(__file__).parent))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert "fully_shard(lin)" in r0["refusal"] and "NO_WRAP" in r0["refusal"], r0["refusal"]
    sharded = [n for n, (kind, local, full) in r0["shards"].items() if kind == "DTensor" and local[0] < full[0]]
    assert sharded and r0["sharded"], r0["shards"]  # delta is stored sharded between steps

    from hf_taskarith.linearize import LinearizedModel

    model, ds = _model_and_data()
    lin = LinearizedModel(model)
    lin(**{k: torch.tensor(ds[k]) for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
    assert r0["base_fingerprint"] == lin.base_fingerprint
    expected = lin.task_vector()
    for name in expected.keys():
        t0, t1 = r0["tv"][name], r1["tv"][name]
        assert type(t0) is torch.Tensor and t0.shape == expected[name].shape, name
        torch.testing.assert_close(t1, t0, rtol=0, atol=0, msg=name)
        d = lin.deltas().get(name)
        if d is not None:
            torch.testing.assert_close(r0["weights"][f"delta.{name}"], t0, rtol=0, atol=0, msg=name)
        if d is not None:
            assert d.grad is not None and t0.abs().sum() > 0, name
            torch.testing.assert_close(t0, -LR * d.grad, rtol=1e-4, atol=1e-7, msg=name)


if __name__ == "__main__":
    worker(sys.argv[1])
