"""Distillation without pruning under FSDP2 on the CPU: two processes under torchrun (gloo, no GPU, no `use_cpu`
given) against one process with the same global batch. After every optimizer step both ranks hold the same whole
weights as one process; the saved model reloads with the logits of the gathered weights; a recipe's distill stage
trains under FSDP; pruning under FSDP and FSDP1 on the CPU are refused before any training.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from recipe_run import make_tiny_assets
from test_llama import tokens
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from utils import TinyDataset, batch, tiny_model

from hf_prune import PruningArguments, PruningTrainer, load_pruned

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "fsdp_train.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]


def _run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return {k: str(v) for k, v in make_tiny_assets(tmp_path_factory.mktemp("assets")).items()}


@pytest.fixture(scope="module")
def single(tmp_path_factory, assets):
    folder = tmp_path_factory.mktemp("single")
    _run([sys.executable, SCRIPT, str(folder), json.dumps(assets)])
    return json.loads((folder / "rank0.json").read_text())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, assets):
    folder = tmp_path_factory.mktemp("fsdp")
    _run([*TORCHRUN, SCRIPT, str(folder), json.dumps(assets)])
    return folder, [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("name", ["decoder", "encoder"])
def test_both_ranks_keep_the_whole_weights_of_one_process(single, sharded, name):
    _, (r0, r1) = sharded
    single, r0, r1 = single[name], r0[name], r1[name]
    assert not single["fsdp"]
    assert r0["fsdp"] and r1["fsdp"] and r0["wrapped"].startswith("FSDP"), r0["wrapped"]  # the student is sharded
    assert not r0["teacher_wrapped"].startswith("FSDP")  # the teacher is not
    assert [s["step"] for s in r0["steps"]] == [s["step"] for s in single["steps"]] == [1, 2, 3, 4]
    for a, b, ref in zip(r0["steps"], r1["steps"], single["steps"]):
        assert a == b, f"ranks differ at step {a['step']}"
        assert a["sum"] == pytest.approx(ref["sum"], rel=1e-5, abs=1e-4)
        assert a["abs"] == pytest.approx(ref["abs"], rel=1e-5)
    assert r0["final"] == r1["final"]  # every rank ends with the same whole weights, key by key
    assert r0["final"].keys() == single["final"].keys()
    for key, (total, absolute) in r0["final"].items():
        assert total == pytest.approx(single["final"][key][0], rel=1e-4, abs=1e-4), key
        assert absolute == pytest.approx(single["final"][key][1], rel=1e-4, abs=1e-4), key
    losses = [h["loss"] for h in r0["logs"]]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    # the same loss (world-size scaling and accumulation as on one process) and the same distillation term
    assert losses == pytest.approx([h["loss"] for h in single["logs"]], rel=1e-4)
    assert [h["distill_loss"] for h in r1["logs"]] == pytest.approx(
        [h["distill_loss"] for h in single["logs"]], rel=1e-4, abs=1e-6
    )


@pytest.mark.parametrize("name", ["decoder", "encoder"])
def test_the_saved_model_reloads_with_the_outputs_of_the_gathered_weights(sharded, name):
    folder, ranks = sharded
    auto = AutoModelForCausalLM if name == "decoder" else AutoModelForSequenceClassification
    model = auto.from_pretrained(folder / name / "final").eval()
    assert type(model).__name__ == ("LlamaForCausalLM" if name == "decoder" else "BertForSequenceClassification")
    with torch.no_grad():
        if name == "decoder":
            ids, mask = tokens()
            logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            logits = model(**batch()).logits
    for rank in ranks:
        torch.testing.assert_close(logits, torch.tensor(rank[name]["logits"]), rtol=0, atol=1e-6)


def test_pruning_and_fsdp1_are_refused_before_training(sharded):
    for rank in sharded[1]:
        refused = rank["refusals"]
        assert "Pruning under FSDP or DeepSpeed is not supported" in refused["pruning"]
        assert "FSDP1 (fsdp_config version 1) is not supported on the CPU" in refused["fsdp1"]
        assert "accelerate" in refused["fsdp1"] and torch.__version__ in refused["fsdp1"]


def test_fsdp1_on_the_cpu_is_refused_on_one_process_too(tmp_path):
    args = PruningArguments(tmp_path, fsdp=True, fsdp_config={"version": 1}, use_cpu=True, distill_alpha=0.5)
    with pytest.raises(ValueError, match=r"FSDP1 .* not supported on the CPU.*FSDP2.*or DDP"):
        PruningTrainer(model=tiny_model(), args=args, teacher_model=tiny_model(seed=1), train_dataset=TinyDataset(8))


def test_a_recipe_distill_stage_trains_under_fsdp_and_a_pruning_stage_is_refused(sharded):
    folder, (r0, r1) = sharded
    assert r0["recipe"]["finished"] == r1["recipe"]["finished"] == ["finetune", "distill"]
    assert r0["recipe"]["final"] == r1["recipe"]["final"]  # the next stage starts from the same model on each rank
    saved = load_pruned(folder / "recipe" / "02-distill" / "model").state_dict()
    assert saved.keys() == r0["recipe"]["final"].keys()
    for key, value in saved.items():  # what the main process wrote is the gathered model
        assert [value.double().sum().item(), value.double().abs().sum().item()] == r0["recipe"]["final"][key], key
    # the finetune stage under FSDP wrote a whole teacher too, which the distill stage started from
    teacher = load_pruned(folder / "recipe" / "01-finetune" / "model").state_dict()
    assert teacher.keys() == saved.keys() and any(not torch.equal(teacher[k], saved[k]) for k in saved)
    for rank in (r0, r1):
        assert "Pruning under FSDP or DeepSpeed is not supported" in rank["recipe"]["pruning_error"]
