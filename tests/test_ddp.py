"""Two processes under torchrun and under accelerate launch (gloo, no GPU, no `use_cpu` given), against one process
with the same global batch: after every optimizer step, every pruner has the same masks and the same weights on both
ranks and as on one process.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "ddp_train.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    return env


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"],
    "accelerate": [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534"),
    ],
}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    _run([sys.executable, SCRIPT, str(folder)])
    return json.loads((folder / "rank0.json").read_text())


@pytest.fixture(scope="module", params=list(LAUNCHERS))
def ranks(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    _run([*LAUNCHERS[request.param], SCRIPT, str(folder)])
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


SCENARIOS = [
    "block_movement_teacher",
    "block_magnitude_global",
    "head_movement_global_ga",
    "head_magnitude_teacher",
    "ffn_taylor_teacher_ga",
    "ffn_taylor_global",
    "ffn_movement",
    "joint_taylor_teacher_ga",
    "decoder_group_movement_teacher_ga",
    "decoder_joint_taylor_teacher",
]


@pytest.mark.parametrize("name", SCENARIOS)
def test_both_ranks_keep_the_masks_and_weights_of_one_process(single, ranks, name):
    single, r0, r1 = single[name], ranks[0][name], ranks[1][name]
    assert r0["world_size"] == r1["world_size"] == 2 and r0["parallel_mode"] == "ParallelMode.DISTRIBUTED"
    assert "error" not in r0 and "error" not in r1, r0.get("error") or r1.get("error")
    assert [s["step"] for s in single["steps"]] == [s["step"] for s in r0["steps"]] == list(range(1, 9))
    for a, b, ref in zip(r0["steps"], r1["steps"], single["steps"]):
        # the replicas are the same model, bit for bit, after every step
        assert a == b, f"ranks differ at step {a['step']}"
        # and the same as one process on the same global batch, up to the order of float sums
        assert a["masks"] == ref["masks"], f"masks differ from one process at step {a['step']}"
        assert a["sum"] == pytest.approx(ref["sum"], rel=1e-5, abs=1e-4)
        assert a["abs"] == pytest.approx(ref["abs"], rel=1e-5)
    final = single["steps"][-1]["masks"]
    kept = sum(map(sum, final.values()))
    total = sum(map(len, final.values()))
    assert 0 < kept < total, "the masks never moved: the scenario does not test anything"
    assert [h["loss"] for h in r0["logs"]] == pytest.approx([h["loss"] for h in single["logs"]], rel=1e-4)
    if "distill_loss" in single["logs"][0]:
        assert [h["distill_loss"] for h in r1["logs"]] == pytest.approx(
            [h["distill_loss"] for h in single["logs"]], rel=1e-4
        )


def test_a_rank_whose_masks_differ_stops_the_run_on_every_rank(ranks):
    for rank in ranks:
        assert "process(es) [1] differ from those of process 0" in rank["tampered"]["error"]


def test_a_launch_the_trainer_would_run_as_separate_processes_is_refused(ranks):
    for rank in ranks:
        assert "pass use_cpu=True" in rank["plain_arguments"]["error"]
