"""Results files and folders written whole: unique temporary names, read-modify-writes under a lock from several
processes, files of one folder written together (completed after a kill), and folders swapped in one atomic step
(the published model cards of benchmarks/accuracy_at_speed.py)."""

import importlib.util
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from utils import KILLED_BEFORE_REPORT

from hf_prune import utils
from hf_prune.utils import (
    LOCK_MARK,
    TMP_MARK,
    exchange_paths,
    file_lock,
    recover_files_together,
    swap_into_place,
    temporary_folder,
    temporary_path,
    update_json_atomic,
    write_files_together,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parent.parent


def test_temporary_names_are_unique_and_recoverable(tmp_path):
    target = tmp_path / "results.json"
    names = {temporary_path(target) for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert name.parent == tmp_path and name.name.startswith(f".results.json{TMP_MARK}{os.getpid()}-")
    assert temporary_path(target, ".onnx").suffix == ".onnx"
    assert not list(tmp_path.iterdir())  # nothing is created


def test_concurrent_whole_file_writes_never_share_a_temporary_file(tmp_path):
    """Two threads writing one file at once: with one fixed temporary name the second writer's rename would find
    the file moved away, or rename the other's half-written file."""
    path, errors = tmp_path / "results.json", []

    def writer(tag):
        try:
            for i in range(200):
                write_json_atomic(path, {"writer": tag, "i": i, "pad": "x" * 2000})
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(path.read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _add_keys(path: str, prefix: str, start, count: int) -> None:
    start.wait()
    for i in range(count):
        row = {f"{prefix}{i}": i}
        update_json_atomic(path, lambda obj, row=row: obj.setdefault("rows", {}).update(row))


@pytest.mark.skipif(sys.platform != "linux", reason="fcntl.flock between forked processes (Linux)")
def test_two_processes_updating_one_file_lose_no_update(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"rows": {}, "setup": "kept"})
    context = multiprocessing.get_context("fork")
    start = context.Event()
    workers = [context.Process(target=_add_keys, args=(str(path), p, start, 50)) for p in ("a", "b")]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    result = json.loads(path.read_text())
    assert sorted(result["rows"]) == sorted([f"a{i}" for i in range(50)] + [f"b{i}" for i in range(50)])
    assert result["setup"] == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no lock or temporary file left


def test_the_lock_excludes_another_process_and_is_removed(tmp_path):
    path = tmp_path / "results.json"
    code = (
        "import sys, time\n"
        "from hf_prune.utils import file_lock\n"
        "with file_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(1.5)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert (tmp_path / f".results.json{LOCK_MARK}").exists()
    began = time.perf_counter()
    with file_lock(path):
        waited = time.perf_counter() - began  # taken only once the other process let go, 1.5 s after it said so
    holder.wait()
    assert waited > 1.0
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------- together
def test_files_written_together_are_completed_after_a_kill(tmp_path):
    """Killed after the first rename: the card is new, the report old (never a new report beside an old card);
    the next call completes the report."""
    card, report = tmp_path / "README.md", tmp_path / "pruning_report.json"
    card.write_text("old card")
    report.write_text('{"old": true}')
    killed = (
        "import sys\n"
        "from hf_prune import utils\n"
        + KILLED_BEFORE_REPORT
        + "folder = Path(sys.argv[1])\n"
        + "files = {folder / 'README.md': 'new card', folder / 'pruning_report.json': '{\"new\": 1}'}\n"
        + "utils.write_files_together(files)\n"
    )
    done = subprocess.run([sys.executable, "-c", killed, str(tmp_path)])
    assert done.returncode == 9
    assert card.read_text() == "new card" and json.loads(report.read_text()) == {"old": True}
    assert recover_files_together(tmp_path) == ["pruning_report.json"]
    assert card.read_text() == "new card" and json.loads(report.read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "pruning_report.json"]


def test_a_kill_before_the_commit_list_changes_nothing(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("old card")
    killed = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from hf_prune import utils\n"
        "utils.write_json_atomic = lambda *args, **kwargs: os._exit(9)\n"
        "folder = Path(sys.argv[1])\n"
        "utils.write_files_together({folder / 'README.md': 'new card', folder / 'pruning_report.json': '{}'})\n"
    )
    assert subprocess.run([sys.executable, "-c", killed, str(tmp_path)]).returncode == 9
    assert recover_files_together(tmp_path) == []
    utils.recover_interrupted(card)
    utils.recover_interrupted(tmp_path / "pruning_report.json")
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"] and card.read_text() == "old card"
    with pytest.raises(ValueError, match="one folder"):
        write_files_together({tmp_path / "a": "x", tmp_path / "sub" / "b": "y"})


# ----------------------------------------------------------------------------------------------------- swaps
def _exchange_works(folder: Path) -> bool:
    a, b = folder / "probe-a", folder / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return exchange_paths(a, b)
    finally:
        shutil.rmtree(a)
        shutil.rmtree(b)


def _watch_steps(monkeypatch, folder: Path, seen: list):
    """Records, after every rename and removal, whether `folder` holds its README (what a reader would find)."""
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(src, dst):
        real_replace(src, dst)
        seen.append((folder / "README.md").is_file())

    def rmtree(path, *args, **kwargs):
        seen.append((folder / "README.md").is_file())
        real_rmtree(path, *args, **kwargs)
        seen.append((folder / "README.md").is_file())

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


def test_a_folder_swapped_in_is_never_missing(tmp_path, monkeypatch):
    if not _exchange_works(tmp_path):
        pytest.skip("this filesystem has no atomic exchange (renameat2 RENAME_EXCHANGE)")
    target = tmp_path / "card"
    target.mkdir()
    (target / "README.md").write_text("old")
    new = temporary_folder(target)
    (new / "README.md").write_text("new")
    seen = []
    _watch_steps(monkeypatch, target, seen)
    swap_into_place(new, target)
    monkeypatch.undo()
    assert seen and all(seen) and (target / "README.md").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["card"]
    # the two-rename fallback (systems without the exchange) leaves a moment without the folder
    new = temporary_folder(target)
    (new / "README.md").write_text("newer")
    seen = []
    _watch_steps(monkeypatch, target, seen)
    swap_into_place(new, target, exchange=False)
    monkeypatch.undo()
    assert False in seen and (target / "README.md").read_text() == "newer"


def _benchmark(name: str):
    """A benchmark script imported as a module (its folder on the path, for its sibling imports)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accuracy_at_speed():
    return _benchmark("accuracy_at_speed")


def test_publish_card_replaces_the_card_folder_in_one_step(tmp_path, monkeypatch):
    if not _exchange_works(tmp_path):
        pytest.skip("this filesystem has no atomic exchange (renameat2 RENAME_EXCHANGE)")
    publish_card = _accuracy_at_speed().publish_card
    export, cards = tmp_path / "export", tmp_path / "cards" / "minilm-2x"
    export.mkdir()
    for name, text in (("README.md", "card 1"), ("pruning_report.json", "{}"), ("model.safetensors", "weights")):
        (export / name).write_text(text)
    publish_card(export, cards)
    assert sorted(p.name for p in cards.iterdir()) == ["README.md", "pruning_report.json"]  # never the weights
    (export / "README.md").write_text("card 2")
    seen = []
    _watch_steps(monkeypatch, cards, seen)
    publish_card(export, cards)
    monkeypatch.undo()
    assert seen and all(seen)
    assert (cards / "README.md").read_text() == "card 2"
    assert [p.name for p in cards.parent.iterdir()] == ["minilm-2x"]


def test_row_keys_name_their_run_folders_with_and_without_seeds(tmp_path):
    module = _accuracy_at_speed()
    key = module.row_key("teacher-abc", 2.0, "naive-b-as-fisher-latency-distill", 626, 43)
    assert key == "teacher-abc/2x/naive-b-as-fisher-latency-distill/626/seed43"
    folder = module.row_folder(tmp_path, key)
    assert folder == tmp_path / "teacher-abc" / "2x" / "naive-b-as-fisher-latency-distill-626-seed43"
    key = module.row_key("teacher-abc", 3.0, "fisher-latency-distill", 626, 42)  # seed 42: the keys of earlier runs
    assert key == "teacher-abc/3x/fisher-latency-distill/626"
    assert module.row_folder(tmp_path, key) == tmp_path / "teacher-abc" / "3x" / "fisher-latency-distill-626"
    results = json.loads((ROOT / "benchmarks" / "results" / "accuracy_at_speed.json").read_text())
    for key, row in results["rows"].items():  # every published key reads back as the row it names
        seed = row.get("seed", 42)
        assert module.row_key(key.split("/")[0], row["target_speedup"], key.split("/")[2], row["steps"], seed) == key


def test_naive_rows_take_shapes_from_the_run_folder_else_from_the_recorded_row(tmp_path):
    module = _accuracy_at_speed()
    shapes = {"heads_after": [4, 2], "ffn_after": [30, 10], "hidden_after": None, "dropped_layers": []}
    state = {"finished": [{"stage": "prune_to_speedup", "summary": {**shapes, "heads_before": [4, 4]}}]}
    assert module.pruned_shapes(state) == shapes
    assert module.pruned_shapes({"finished": [{"stage": "distill", "summary": {}}]}) is None
    assert module.pruned_shapes({"finished": []}) is None
    recorded = {"shapes": {**shapes, "heads_after": [1, 1]}}
    assert module.row_shapes(tmp_path, recorded) == recorded["shapes"]  # no run folder here: the results row's
    assert module.row_shapes(tmp_path, {"heads": 6}) is None and module.row_shapes(tmp_path, None) is None
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert module.row_shapes(tmp_path, recorded) == shapes  # the run folder's own state first


def test_the_narrow_and_shallow_rows_fix_the_width_or_the_depth_in_a_valid_recipe(tmp_path):
    from types import SimpleNamespace

    from hf_prune.pipeline.schema import load_recipe

    module = _accuracy_at_speed()
    teacher = SimpleNamespace(config=SimpleNamespace(hidden_size=384))
    prune, distill = module.row_stages("fisher-latency-narrow", 6.0, 626, teacher)
    assert prune["prune_hidden"] is True and prune["hidden_widths"] == [288] and prune["cost_model"] == "latency"
    assert distill == {"stage": "distill", "args": {"max_steps": 626}}
    width, _ = module.row_stages("fisher-latency-width", 6.0, 626, teacher)
    assert "hidden_widths" not in width and {**width, "hidden_widths": [288]} == prune  # one change: the fixed width
    recipe = module.base_recipe("model", "teacher", tmp_path, None)
    recipe["stages"] = [prune, distill, *module.closing_stages(6.0)]
    assert load_recipe(recipe)  # the schema accepts the row's stages
    teacher.config.num_hidden_layers = 6
    shallow, _ = module.row_stages("fisher-latency-shallow", 6.0, 626, teacher)
    depth, _ = module.row_stages("fisher-latency-depth", 6.0, 626, teacher)
    assert depth["drop_layers"] is True and {**depth, "layer_counts": [3]} == shallow  # one change: the fixed depth
    recipe["stages"] = [shallow, distill, *module.closing_stages(6.0)]
    assert load_recipe(recipe)
    tried = [{"goal": 6.0, "candidates": [{"width": 288, "loss": 1.0}]}]
    state = {"finished": [{"stage": "prune_to_speedup", "summary": {"structure_search": tried}}]}
    assert module.first_summary(state)["structure_search"] == tried and module.first_summary({}) == {}


def test_a_rerun_row_keeps_its_earlier_records_and_is_not_run_twice(tmp_path):
    module = _accuracy_at_speed()
    first, second, third = {"accuracy": 60.0}, {"accuracy": 61.0}, {"accuracy": 62.0}
    assert module.with_earlier(first, None) == first
    rerun = module.with_earlier(second, first)
    assert rerun == {"accuracy": 61.0, "earlier_runs": [first]}
    assert module.with_earlier(third, rerun)["earlier_runs"] == [first, {"accuracy": 61.0}]
    assert not module.finished_run(tmp_path, 3)  # no state: not run here
    (tmp_path / "state.json").write_text(json.dumps({"finished": [{"stage": "distill"}, {"stage": "evaluate"}]}))
    assert not module.finished_run(tmp_path, 3) and module.finished_run(tmp_path, 2)
    # a record names the run it came from: an older record beside a newer finished run is not that run's
    state = {"created": "2026-12-08T00:00:00Z", "finished": []}
    assert module.recorded_here({"run_created": "2026-12-08T00:00:00Z"}, state)
    assert not module.recorded_here({"run_created": "2026-12-01T00:00:00Z", "accuracy": 61.0}, state)
    assert module.recorded_here({"accuracy": 61.0}, state)  # recorded before records named their run


def test_the_deployed_table_reads_each_onnx_form_of_a_row():
    module = _accuracy_at_speed()
    forms = [
        {"name": "pruned ONNX fp32", "metrics": {"validation_matched": 0.63},
         "latency": [{"batch_size": 1, "speedup": 4.5}, {"batch_size": 32, "speedup": 5.0}]},
        {"name": "pruned ONNX int8", "latency": [{"batch_size": 32, "speedup": 7.75}], "metrics": {}},
    ]  # fmt: skip
    row = {"teacher_accuracy": 0.66, "deployment": {"forms": forms}, "target_speedup": 4.0, "row": "r", "layers": 5,
           "hidden": 320}  # fmt: skip
    assert module.deployed_cells(row) == ["5.00x", "63.00 (-3.00)", "7.75x", "-"]
    assert module.deployed_cells({"teacher_accuracy": 0.66}) == ["-"] * 4
    table = module.deployed_table({"rows": {"a": row, "b": {**row, "target_speedup": 2.0, "deployment": None}}})
    assert table.splitlines()[2] == "| 4x | r | 42 | 5 | 320 | 5.00x | 63.00 (-3.00) | 7.75x | - |"
    assert len(table.splitlines()) == 3  # a 2x row without deployed forms is not in it


def _teacher_curve():
    return _benchmark("teacher_curve")


def test_the_teacher_names_the_model_it_was_fine_tuned_from(tmp_path):
    from hf_prune.export.persistence import load_pruned
    from hf_prune.pipeline.metrics_cache import model_digest
    from hf_prune.pipeline.sources import BASE_MODEL_KEY
    from tests.utils import tiny_model

    module = _teacher_curve()
    checkpoint = tmp_path / "stage" / "checkpoints" / "checkpoint-7"
    tiny_model().save_pretrained(checkpoint)
    teacher = tmp_path / "teacher"
    module.teacher_from_checkpoint(tmp_path / "stage", 7, teacher, "org/base-model")
    assert json.loads((teacher / "config.json").read_text())[BASE_MODEL_KEY] == "org/base-model"
    digest = model_digest(load_pruned(teacher))
    assert digest == model_digest(load_pruned(checkpoint))
    # a teacher saved before the base was recorded gains it, its weights untouched
    config = json.loads((teacher / "config.json").read_text())
    del config[BASE_MODEL_KEY]
    (teacher / "config.json").write_text(json.dumps(config))
    module.teacher_from_checkpoint(tmp_path / "stage", 7, teacher, "org/base-model")
    assert json.loads((teacher / "config.json").read_text())[BASE_MODEL_KEY] == "org/base-model"
    assert model_digest(load_pruned(teacher)) == digest


def test_the_teacher_rebuild_stops_at_the_chosen_checkpoint_on_the_whole_runs_schedule(tmp_path):
    import torch
    from safetensors.torch import load_file

    from hf_prune import PruningTrainer
    from tests.utils import TinyDataset, tiny_model, train_args

    module = _teacher_curve()

    def run(out, callbacks=()):
        args = train_args(out, num_train_epochs=3, save_strategy="epoch", lr_scheduler_type="linear")
        data = TinyDataset(32)
        PruningTrainer(model=tiny_model(), args=args, train_dataset=data, callbacks=list(callbacks)).train()

    run(tmp_path / "whole")  # 3 epochs of 4 steps
    with pytest.raises(module.ReachedStep):
        run(tmp_path / "stopped", [module.StopAfterCheckpoint(8)])
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    whole = load_file(tmp_path / "whole" / "checkpoint-8" / "model.safetensors")
    stopped = load_file(tmp_path / "stopped" / "checkpoint-8" / "model.safetensors")
    assert whole.keys() == stopped.keys()
    # the same weights as the whole run's at that step: its learning-rate schedule was not shortened
    assert all(torch.equal(whole[k], stopped[k]) for k in whole)


def test_the_teacher_folder_is_recorded_relative_to_the_runs_folder(tmp_path):
    module = _teacher_curve()
    assert module.teacher_folder_name(module.RUNS / "teacher-curve" / "teacher") == "teacher-curve/teacher"
    assert module.teacher_folder_name(tmp_path / "teacher") == str(tmp_path / "teacher")


def test_seed_summary_gives_mean_and_spread_and_counts_only_seeds_with_held_out_accuracy():
    summary = _accuracy_at_speed().seed_summary(
        [
            {"accuracy": 0.60, "heldout_accuracy": None, "speedup_b32": 2.0},  # an earlier run: no held-out figure
            {"accuracy": 0.62, "heldout_accuracy": 0.70, "speedup_b32": 2.2},
            {"accuracy": 0.64, "heldout_accuracy": 0.72, "speedup_b32": 2.4},
        ]
    )
    # sample standard deviations: 2.00 points, 1.41 points (two seeds), 0.20x
    assert summary == (
        "validation_matched 62.00 +- 2.00 (min 60.00, max 64.00), heldout 71.00 +- 1.41 (2 seeds), "
        "CPU b32 2.20 +- 0.20x"
    )


def test_retime_present_only_times_the_rows_whose_exports_are_here_and_keeps_the_others(tmp_path):
    from hf_prune import save_pruned
    from tests.utils import tiny_model

    module = _accuracy_at_speed()
    tag, teacher = "teacher-abc", tiny_model(max_position_embeddings=160).eval()  # the retime times 128 tokens
    earlier = {"speedup_b1": 1.5, "speedup_b32": 1.6, "retimed": {"at": "earlier"}}
    here, gone = f"{tag}/2x/fisher-latency-distill/626/seed43", f"{tag}/2x/fisher-latency-distill/626"
    results = {
        "rows": {gone: dict(earlier), here: {"speedup_b1": 1.0, "speedup_b32": 1.0}},
        "retime_noise": {"at": "earlier", "groups": [], "largest_relative_spread": {"b1": 0.01, "b32": 0.02}},
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    export = module.row_folder(tmp_path, here) / "final"
    save_pruned(tiny_model(seed=1, max_position_embeddings=160), export, card=False)
    with pytest.raises(SystemExit, match="--present-only"):  # by default a missing export stops the retime
        module.retime(json.loads(path.read_text()), path, teacher, tmp_path, tag, repeats=1)
    module.retime(json.loads(path.read_text()), path, teacher, tmp_path, tag, repeats=1, present_only=True)
    on_disk = json.loads(path.read_text())
    assert on_disk["rows"][gone] == earlier  # not here: its earlier retime stays
    row = on_disk["rows"][here]
    assert row["speedup_b1_at_run"] == 1.0 and row["retimed"]["models_interleaved"] == 2
    assert row["retimed"]["cpu"]["threads"] == torch.get_num_threads()
    assert on_disk["earlier_retime_noise"] == [results["retime_noise"]] and on_disk["retime_noise"]["at"] != "earlier"
    other = f"{tag}/3x/fisher-latency-distill/626"
    other_export = module.row_folder(tmp_path, other) / "final"
    save_pruned(tiny_model(seed=2, max_position_embeddings=160), other_export, card=False)
    on_disk["rows"][other] = {"speedup_b1": 1.0, "speedup_b32": 1.0}
    path.write_text(json.dumps(on_disk))
    module.retime(json.loads(path.read_text()), path, teacher, tmp_path, tag, repeats=1, present_only=True,
                  targets=[3.0])  # fmt: skip
    again = json.loads(path.read_text())
    assert again["rows"][here] == row and again["rows"][other]["retimed"]["models_interleaved"] == 2  # 3x only


def test_the_teacher_rebuild_refuses_a_record_whose_teacher_is_not_a_curve_checkpoint(tmp_path):
    from types import SimpleNamespace

    module = _teacher_curve()
    recorded = json.loads((ROOT / "benchmarks" / "results" / "teacher_curve.json").read_text())
    refit = {**recorded, "teacher_train": "train_subset_8999.jsonl + train_subset_extra_1000.jsonl (9,999 pairs)"}
    args = SimpleNamespace(refit=False, output_dir=str(tmp_path), results=str(tmp_path / "r.json"))
    with pytest.raises(SystemExit, match="--refit"):
        module.rebuild(args, tmp_path, refit)
    with pytest.raises(SystemExit, match="--refit"):  # asked for both at once
        module.rebuild(SimpleNamespace(**{**vars(args), "refit": True}), tmp_path, recorded)
    assert not (tmp_path / "r.json").exists()
