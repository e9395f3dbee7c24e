import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


def _run(cmd, env=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("RANK", None)
    return env


def test_two_process_distillation_and_pruning_match_one_process(tmp_path):
    script = os.path.join(HERE, "ddp_train.py")
    _run([sys.executable, script, str(tmp_path / "single"), "8"], env=_env())
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            script,
            str(tmp_path / "ddp"),
            "4",
        ],
        env=_env(),
    )
    single = json.load(open(tmp_path / "single" / "losses-rank0.json"))
    ranks = [json.load(open(tmp_path / "ddp" / f"losses-rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    ref = [h["loss"] for h in single["logs"]]
    assert len(ref) == 4
    for r in ranks:
        assert [h["loss"] for h in r["logs"]] == pytest.approx(ref, rel=1e-4)
        assert [h["distill_loss"] for h in r["logs"]] == pytest.approx(
            [h["distill_loss"] for h in single["logs"]], rel=1e-4
        )
        assert r["masks"] == single["masks"]
    assert sum(map(sum, single["masks"])) == sum(len(m) for m in single["masks"]) // 2
