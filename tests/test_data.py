"""Tests for the dataset pipeline: readers, formats, masking, packing, padding, order, errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from peftlab.train.data import (
    IGNORE_INDEX,
    Collator,
    DataConfig,
    DataError,
    EpochBatchSampler,
    batch_order,
    load_records,
    pack_examples,
    prepare_data,
    split_eval,
)
from tests.conftest import make_bert_classifier, make_llama

FIXTURES = Path(__file__).parent / "fixtures"
# A ChatML-like template whose turns end with the EOS token "</s>".
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def bpe():
    """Byte-level BPE with a BOS prefix; decoding gives back the exact text."""
    tok = AutoTokenizer.from_pretrained(FIXTURES / "bpe_tokenizer")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bpe_plain():
    """The same tokenizer without a chat template."""
    return AutoTokenizer.from_pretrained(FIXTURES / "bpe_tokenizer")


@pytest.fixture(scope="module")
def llama(bpe):
    """A tiny random Llama sized to the BPE fixture's vocabulary (built once: model setup is slow)."""
    return make_llama(vocab_size=len(bpe))


@pytest.fixture(scope="module")
def wordpiece():
    return AutoTokenizer.from_pretrained(FIXTURES / "wordpiece_tokenizer")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_runs(tokenizer, example) -> list[str]:
    """Decode each contiguous run of scored labels (the text the loss is computed on)."""
    runs, current = [], []
    for label in example["labels"] + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


ALPACA = [{"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
          {"instruction": "Translate to French:", "input": "good morning", "output": "Bonjour."}]


# ---------------------------------------------------------------- reading files

def test_reads_every_supported_file_kind_with_origins(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "a dog", "label": "animal"}, {"text": "an apple", "label": "food"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 2, "data": rows}))
    with open(tmp_path / "d.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))

    for name in ["d.jsonl", "list.json", "wrapped.json", "d.csv", "d.parquet", "saved", "dd"]:
        records = load_records(tmp_path / name)
        assert [dict(r) for r in records] == rows, name
    assert load_records(tmp_path / "d.jsonl")[1].origin == f"{tmp_path / 'd.jsonl'}, line 2"
    assert load_records(tmp_path / "d.csv")[1].origin == f"{tmp_path / 'd.csv'}, line 3"
    assert load_records(tmp_path / "list.json")[0].origin.endswith("list.json, item 0")
    assert load_records(tmp_path / "d.parquet")[1].origin.endswith("d.parquet, row 1")
    assert [dict(r) for r in load_records(tmp_path / "dd", split="test")] == rows[:1]
    assert load_records(tmp_path / "dd", split="test")[0].origin.endswith("dd [test], row 0")
    # several sources, a glob pattern, and in-memory dicts
    assert len(load_records([tmp_path / "d.jsonl", tmp_path / "d.csv"])) == 4
    assert len(load_records(str(tmp_path / "*.json"))) == 4
    assert load_records(rows)[1].origin == "record 1"


def test_jsonl_skips_blank_lines_and_counts_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [r.origin.rsplit(" ", 1)[1] for r in load_records(path)] == ["1", "3"]


@pytest.mark.parametrize("content, expected", [
    ('{"text": "ok"}\n{"text": "bad",}\n', "data.jsonl, line 2: invalid JSON (Expecting property name"),
    ('{"text": "ok"}\n["not", "an object"]\n', "data.jsonl, line 2: expected a JSON object"),
    ("", "data.jsonl: the file holds no records (empty dataset)"),
    ("\n\n", "data.jsonl: the file holds no records (empty dataset)"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, expected):
    (tmp_path / "data.jsonl").write_text(content)
    with pytest.raises(DataError) as excinfo:
        load_records(tmp_path / "data.jsonl")
    assert expected in one_line_error(excinfo)


def test_bad_files_and_paths(tmp_path):
    cases = {}
    (tmp_path / "notes.txt").write_text("hello")
    cases["notes.txt"] = "notes.txt: unsupported file type '.txt'; use .jsonl, .json, .csv"
    (tmp_path / "broken.json").write_text('[{"text": "a"},\n {"text": }]')
    cases["broken.json"] = "broken.json, line 2: invalid JSON"
    (tmp_path / "scalar.json").write_text('"just a string"')
    cases["scalar.json"] = "scalar.json: expected a JSON list of objects, got a string"
    (tmp_path / "two.json").write_text('{"a": [], "b": []}')
    cases["two.json"] = "exactly one list field"
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    cases["latin1.jsonl"] = "latin1.jsonl: cannot read the file (not UTF-8 text"
    (tmp_path / "wide.csv").write_text("text,label\na,1\nb,2,extra\n")
    cases["wide.csv"] = "wide.csv, line 3: the row has 3 cells but the header names 2 columns"
    (tmp_path / "short.csv").write_text('text,label\n"multi\nline",1\nb\n')
    cases["short.csv"] = "short.csv, line 4: the row has 1 cells but the header names 2 columns"
    (tmp_path / "empty.json").write_text("[]")
    cases["empty.json"] = "empty.json: the file holds no records (empty dataset)"
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    cases["lines.json"] = "lines.json, line 2: invalid JSON (Extra data at column 1); a .json file holds one"
    (tmp_path / "folder").mkdir()
    cases["folder"] = "folder: a folder must be a dataset saved with datasets' save_to_disk"
    cases["missing.jsonl"] = "missing.jsonl: no such file or folder"
    cases["nothing-*.jsonl"] = "nothing-*.jsonl: the pattern matches no files"
    for name, expected in cases.items():
        with pytest.raises(DataError) as excinfo:
            load_records(str(tmp_path / name))
        assert expected in one_line_error(excinfo), name


def test_dataset_dict_split_errors_list_the_splits(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"text": "a"}])
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as excinfo:
        load_records(tmp_path / "dd")
    assert "none is 'train'; choose one of: a, b" in one_line_error(excinfo)
    with pytest.raises(DataError) as excinfo:
        load_records(tmp_path / "dd", split="validation")
    assert "split 'validation' not found; choose one of: a, b" in one_line_error(excinfo)


def test_eval_fraction_is_deterministic_and_disjoint():
    records = load_records([{"text": str(i)} for i in range(100)])
    train, evaluation = split_eval(records, 0.2, seed=3)
    again_train, again_eval = split_eval(records, 0.2, seed=3)
    assert [r["text"] for r in evaluation] == [r["text"] for r in again_eval]
    assert [r["text"] for r in train] == [r["text"] for r in again_train]
    assert len(evaluation) == 20 and len(train) == 80
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}
    assert [int(r["text"]) for r in train] == sorted(int(r["text"]) for r in train)   # order kept
    assert [r["text"] for r in split_eval(records, 0.2, seed=4)[1]] != [r["text"] for r in evaluation]
    with pytest.raises(DataError, match="leaves no eval examples"):
        split_eval(records[:3], 0.1, seed=0)


# ---------------------------------------------------------------- causal formats and masking

def test_alpaca_masks_the_prompt_and_trains_on_output_and_eos(tmp_path, bpe):
    data = prepare_data(DataConfig(train=ALPACA, format="alpaca"), bpe)
    first, second = data.train.examples
    assert first["input_ids"][0] == bpe.bos_token_id
    assert trained_runs(bpe, first) == ["The capital of France is Paris.</s>"]
    assert trained_runs(bpe, second) == ["Bonjour.</s>"]
    prompt = bpe.decode([i for i, lab in zip(second["input_ids"], second["labels"]) if lab == IGNORE_INDEX])
    assert prompt.startswith("<s>Below is an instruction that describes a task, paired with an input")
    assert prompt.endswith("### Input:\ngood morning\n\n### Response:\n")
    assert "### Input:" not in bpe.decode(first["input_ids"])
    assert data.train.stats["trained_tokens"] == sum(l != IGNORE_INDEX for e in data.train for l in e["labels"])


def test_train_on_inputs_scores_every_token_but_the_first(bpe):
    data = prepare_data(DataConfig(train=ALPACA, format="alpaca", train_on_inputs=True), bpe)
    for example in data.train:
        assert example["labels"][0] == IGNORE_INDEX
        assert example["labels"][1:] == example["input_ids"][1:]
        assert example["input_ids"][-1] == bpe.eos_token_id


def test_prompt_completion_and_field_remapping(bpe):
    rows = [{"question": "What is the capital of France?", "answer": " Paris."}]
    cfg = DataConfig(train=rows, format="prompt_completion", fields={"prompt": "question", "completion": "answer"})
    (example,) = prepare_data(cfg, bpe).train.examples
    assert trained_runs(bpe, example) == [" Paris.</s>"]
    assert bpe.decode(example["input_ids"]) == "<s>What is the capital of France? Paris.</s>"


def test_text_format_trains_on_all_of_the_text(bpe):
    (example,) = prepare_data(DataConfig(train=[{"text": "The quick brown fox."}], format="text"), bpe).train
    assert bpe.decode(example["input_ids"]) == "<s>The quick brown fox.</s>"
    assert trained_runs(bpe, example) == ["The quick brown fox.</s>"]   # BOS is never a target
    no_eos = prepare_data(DataConfig(train=[{"text": "The fox."}], format="text", add_eos=False), bpe)
    assert no_eos.train[0]["input_ids"][-1] != bpe.eos_token_id


def test_chat_trains_on_each_assistant_turn_only(bpe):
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Translate to French: good morning"},
        {"role": "assistant", "content": "Bonjour."}]}
    (example,) = prepare_data(DataConfig(train=[conversation], format="chat"), bpe).train
    assert bpe.decode(example["input_ids"]) == bpe.apply_chat_template(conversation["messages"], tokenize=False)
    assert trained_runs(bpe, example) == ["Paris.</s>", "Bonjour.</s>"]
    everything = prepare_data(DataConfig(train=[conversation], format="chat", train_on_inputs=True), bpe)
    assert everything.train[0]["labels"][1:] == everything.train[0]["input_ids"][1:]


def test_chatml_template_trains_on_reply_end_marker_and_newline(bpe_plain):
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    row = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                        {"role": "assistant", "content": "Paris."}]}
    (example,) = prepare_data(DataConfig(train=[row], format="chat", chat_template=chatml), bpe_plain).train
    assert trained_runs(bpe_plain, example) == ["Paris.<|im_end|>\n"]
    assert bpe_plain.decode(example["input_ids"]).startswith("<|im_start|>user\nWhat is")   # no BOS added


def test_chat_accepts_sharegpt_fields_and_role_aliases(bpe):
    row = {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "how can I help?"}]}
    cfg = DataConfig(train=[row], format="chat", fields={"messages": "conversations", "role": "from", "content": "value"})
    assert trained_runs(bpe, prepare_data(cfg, bpe).train[0]) == ["how can I help?</s>"]


def test_alpaca_through_the_chat_template(bpe):
    cfg = DataConfig(train=ALPACA[1:], format="alpaca", use_chat_template=True)
    (example,) = prepare_data(cfg, bpe).train
    assert bpe.decode(example["input_ids"]) == (
        "<|user|>Translate to French:\n\ngood morning</s><|assistant|>Bonjour.</s>")
    assert trained_runs(bpe, example) == ["Bonjour.</s>"]


def test_chat_template_from_the_config_overrides_the_tokenizer(bpe_plain):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    (example,) = prepare_data(DataConfig(train=[row], format="chat", chat_template=template), bpe_plain).train
    assert trained_runs(bpe_plain, example) == ["hello\n"]


def test_truncation_cuts_the_end_and_drops_examples_left_without_targets(bpe):
    long_output = {"instruction": "Give three tips for staying healthy.", "input": "",
                   "output": "Eat well, sleep enough, and move every day."}
    prompt_len = len(bpe(alpaca_prompt_for(long_output)).input_ids)
    cfg = DataConfig(train=[long_output, {**long_output, "instruction": "x " * 200}], format="alpaca",
                     max_seq_len=prompt_len + 3)
    data = prepare_data(cfg, bpe)
    (example,) = data.train.examples                       # the second prompt alone is too long
    assert len(example["input_ids"]) == prompt_len + 3
    assert len(trained_runs(bpe, example)[0]) < len(long_output["output"])
    assert data.train.stats == {**data.train.stats, "records": 2, "examples": 1, "dropped": 1, "truncated": 2}
    with pytest.raises(DataError) as excinfo:
        prepare_data(DataConfig(train=[long_output], format="alpaca", max_seq_len=8), bpe)
    assert "train data (records): empty after truncation/filtering" in one_line_error(excinfo)
    assert "max_seq_len 8" in str(excinfo.value)


def alpaca_prompt_for(record: dict) -> str:
    from peftlab.train.formats import ALPACA_PROMPT

    return ALPACA_PROMPT.format(instruction=record["instruction"])


# ---------------------------------------------------------------- format errors

def test_missing_field_names_file_line_field_and_present_fields(tmp_path, bpe):
    path = write_jsonl(tmp_path / "train.jsonl", [ALPACA[0], {"instruction": "hi", "response": "hello"}])
    with pytest.raises(DataError) as excinfo:
        prepare_data(DataConfig(train=str(path), format="alpaca"), bpe)
    message = one_line_error(excinfo)
    assert f"{path}, line 2: field 'output' is missing" in message
    assert "the record has fields: 'instruction', 'response'" in message
    assert "fields.output" in message


def test_wrong_field_type_and_unknown_options(tmp_path, bpe):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": ["a", "list"]}])
    with pytest.raises(DataError) as excinfo:
        prepare_data(DataConfig(train=str(path), format="text"), bpe)
    assert "t.jsonl, line 1: field 'text' must be a string, got a list" in one_line_error(excinfo)
    with pytest.raises(DataError, match="unknown format 'sharegpt'; choose one of alpaca, chat"):
        DataConfig(train=str(path), format="sharegpt")
    with pytest.raises(DataError, match="format 'text' has no field 'prompt'; remappable fields are: text"):
        DataConfig(train=str(path), format="text", fields={"prompt": "p"})
    with pytest.raises(DataError, match="either an eval file or eval_fraction"):
        DataConfig(train=str(path), eval=str(path), eval_fraction=0.1)
    with pytest.raises(DataError, match="packing applies to causal-LM formats only"):
        DataConfig(train=str(path), format="classification", packing=True)


def test_chat_errors(tmp_path, bpe, bpe_plain):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError) as excinfo:
        prepare_data(DataConfig(train=str(path), format="chat"), bpe)
    message = one_line_error(excinfo)
    assert f"{path}, line 2: message 1 has unknown role 'robot'" in message
    assert "valid roles are system, user, assistant, tool" in message

    with pytest.raises(DataError) as excinfo:
        prepare_data(DataConfig(train=str(path), format="chat"), bpe_plain)
    assert "needs one, but tokenizer" in one_line_error(excinfo) and "set chat_template" in str(excinfo.value)

    only_user = write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"u.jsonl, line 1: the conversation has no assistant message"):
        prepare_data(DataConfig(train=str(only_user), format="chat"), bpe)

    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('start with a system turn') }}{% endif %}"
    with pytest.raises(DataError) as excinfo:
        prepare_data(DataConfig(train=str(path), format="chat", chat_template=strict), bpe)
    assert f"{path}, line 1: the chat template failed on this conversation (start with a system turn)" \
        == one_line_error(excinfo)

    no_content = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match=r"c.jsonl, line 1: message 0 \('user'\): 'content' is missing"):
        prepare_data(DataConfig(train=str(no_content), format="chat"), bpe)


def test_chat_template_that_rewrites_history_is_refused(bpe_plain):
    # Shows only the last user turn: earlier text changes as turns are added.
    template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    with pytest.raises(DataError) as excinfo:
        prepare_data(DataConfig(train=rows, format="chat", chat_template=template), bpe_plain)
    assert "record 0: the chat template renders earlier turns differently" in one_line_error(excinfo)
    cfg = DataConfig(train=rows, format="chat", chat_template=template, train_on_inputs=True)
    (example,) = prepare_data(cfg, bpe_plain).train          # the whole text is trained: no turns needed
    assert bpe_plain.decode(example["input_ids"]) == "hello"


# ---------------------------------------------------------------- classification

def test_classification_string_labels_pairs_and_label_lists(wordpiece):
    rows = [{"text": "a small dog", "label": "animal"}, {"text": "an edible fruit", "label": "food"},
            {"text": "the lazy dog", "label": "animal"}]
    data = prepare_data(DataConfig(train=rows, format="classification", max_seq_len=16), wordpiece)
    assert data.label_names == ["animal", "food"]
    assert [e["labels"] for e in data.train] == [0, 1, 0]
    assert wordpiece.decode(data.train[0]["input_ids"]) == "[CLS] a small dog [SEP]"

    cfg = DataConfig(train=rows, format="classification", labels=["food", "animal"])
    assert [e["labels"] for e in prepare_data(cfg, wordpiece).train] == [1, 0, 1]
    cfg = DataConfig(train=rows, format="classification", labels={"food": 1, "animal": 0})
    assert prepare_data(cfg, wordpiece).label_names == ["animal", "food"]

    pairs = [{"premise": "a small dog", "hypothesis": "the cat", "y": 2}]
    cfg = DataConfig(train=pairs, format="classification", num_labels=3,
                     fields={"text": "premise", "text_pair": "hypothesis", "label": "y"})
    (example,) = prepare_data(cfg, wordpiece).train
    assert wordpiece.decode(example["input_ids"]) == "[CLS] a small dog [SEP] the cat [SEP]"
    assert example["token_type_ids"] == [0] * 5 + [1] * 3 and example["labels"] == 2


def test_classification_integer_labels_from_csv_and_truncation(tmp_path, wordpiece):
    (tmp_path / "train.csv").write_text("text,label\nthe quick brown fox jumps over the lazy dog,1\na dog,0\n")
    data = prepare_data(DataConfig(train=str(tmp_path / "train.csv"), format="classification", max_seq_len=5),
                        wordpiece)
    assert [e["labels"] for e in data.train] == [1, 0] and data.label_names == ["0", "1"]
    assert len(data.train[0]["input_ids"]) == 5 and data.train[0]["input_ids"][-1] == wordpiece.sep_token_id


def test_classification_label_errors_list_valid_labels(tmp_path, wordpiece):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "meh"}])
    with pytest.raises(DataError) as excinfo:
        prepare_data(DataConfig(train=str(train), eval=str(evaluation), format="classification"), wordpiece)
    message = one_line_error(excinfo)
    assert f"{evaluation}, line 2: label 'meh' is unknown; valid labels are one of 'neg', 'pos'" in message

    numbered = write_jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 3}])
    with pytest.raises(DataError) as excinfo:
        prepare_data(DataConfig(train=str(numbered), format="classification", num_labels=2), wordpiece)
    assert "n.jsonl, line 2: label 3 is out of range; valid labels are an integer 0..1" in one_line_error(excinfo)

    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "pos"}])
    with pytest.raises(DataError, match="m.jsonl, line 1: label 0 mixes with label names"):
        prepare_data(DataConfig(train=str(mixed), format="classification"), wordpiece)

    boolean = write_jsonl(tmp_path / "b.jsonl", [{"text": "a", "label": True}])
    with pytest.raises(DataError, match="b.jsonl, line 1: field 'label' must be a string or an integer, got a boolean"):
        prepare_data(DataConfig(train=str(boolean), format="classification"), wordpiece)


# ---------------------------------------------------------------- packing

def test_packing_keeps_examples_whole_and_restarts_positions(bpe):
    rows = [{"text": t} for t in ["The quick brown fox.", "A small dog barked.", "Paris.", "The cat slept.",
                                  "Eat well, sleep enough, and move every day."]]
    plain = prepare_data(DataConfig(train=rows, format="text", max_seq_len=24), bpe).train
    packed = prepare_data(DataConfig(train=rows, format="text", max_seq_len=24, packing=True), bpe).train
    assert len(packed) < len(plain) and packed.stats["blocks"] == len(packed)
    assert all(len(b["input_ids"]) <= 24 for b in packed)
    # Splitting every block at its position restarts gives back the unpacked examples, in order.
    pieces = []
    for block in packed:
        starts = [i for i, p in enumerate(block["position_ids"]) if p == 0] + [len(block["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert block["position_ids"][a:b] == list(range(b - a))
            pieces.append({"input_ids": block["input_ids"][a:b], "labels": block["labels"][a:b]})
    assert pieces == [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in plain]
    assert packed.stats["tokens"] == sum(len(b["input_ids"]) for b in packed)


def test_packed_batch_scores_each_example_as_if_alone(llama):
    """Packed sequences through a real Llama give the same logits and loss as separate runs."""
    model = llama
    gen = torch.Generator().manual_seed(0)
    examples = []
    for length in (7, 5, 9, 4):
        ids = torch.randint(3, 128, (length,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    blocks = pack_examples(examples, max_seq_len=16)
    assert [len(b["input_ids"]) for b in blocks] == [12, 13]
    batch = Collator(pad_token_id=0)(blocks)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_out = model(**batch, use_cache=False)
        alone = [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples]
    reference = torch.cat([alone[0], alone[1], alone[2], alone[3]])
    got = torch.cat([packed_out.logits[0, :12], packed_out.logits[1, :13]])
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    # Mean cross-entropy over every scored token of every example, computed independently.
    targets = torch.cat([torch.tensor(e["input_ids"][1:]) for e in examples])
    shifted = torch.cat([a[:-1] for a in alone])
    torch.testing.assert_close(packed_out.loss, torch.nn.functional.cross_entropy(shifted, targets),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- collator

def test_collator_pads_right_and_left():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
    right = Collator(pad_token_id=0)(examples)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in right.values())
    left = Collator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(examples)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert left["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, -100]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left'"):
        Collator(0, padding_side="middle")


def test_collator_classification_and_packed_blocks(wordpiece):
    batch = Collator.for_tokenizer(wordpiece)([{"input_ids": [2, 9, 3], "token_type_ids": [0, 0, 0], "labels": 1},
                                               {"input_ids": [2, 3], "token_type_ids": [0, 0], "labels": 0}])
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].tolist() == [[2, 9, 3], [2, 3, wordpiece.pad_token_id]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    packed = Collator(pad_token_id=0)([{"input_ids": [4, 5, 6], "labels": [-100, 5, 6], "position_ids": [0, 1, 0]},
                                       {"input_ids": [7], "labels": [-100], "position_ids": [0]}])
    assert packed["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert packed["labels"].tolist()[1] == [-100, -100, -100] and "attention_mask" not in packed


def test_collated_batches_run_through_models(llama, bpe, wordpiece):
    data = prepare_data(DataConfig(train=ALPACA, format="alpaca"), bpe)
    loss = llama(**Collator.for_tokenizer(bpe)(data.train.examples)).loss
    assert torch.isfinite(loss) and loss > 0
    bert = make_bert_classifier(vocab_size=len(wordpiece), num_labels=2)
    rows = [{"text": "a small dog", "label": "animal"}, {"text": "an edible fruit with red skin", "label": "food"}]
    data = prepare_data(DataConfig(train=rows, format="classification"), wordpiece)
    out = bert(**Collator.for_tokenizer(wordpiece)(data.train.examples))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)


# ---------------------------------------------------------------- order and resume

def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    first = batch_order(10, 3, seed=1, epoch=0)
    assert first == batch_order(10, 3, seed=1, epoch=0)
    assert sorted(i for b in first for i in b) == list(range(10)) and [len(b) for b in first] == [3, 3, 3, 1]
    assert first != batch_order(10, 3, seed=1, epoch=1) and first != batch_order(10, 3, seed=2, epoch=0)
    assert batch_order(10, 3, seed=1, epoch=0, drop_last=True) == first[:3]
    assert batch_order(5, 2, seed=0, epoch=0, shuffle=False) == [[0, 1], [2, 3], [4]]
    # Pinned values: the order must not change across machines, runs or library upgrades.
    assert batch_order(6, 2, seed=0, epoch=0) == PINNED_ORDER


PINNED_ORDER = [[1, 2], [4, 3], [5, 0]]


def test_length_grouping_cuts_padding_and_still_covers_every_example_once():
    lengths = [(i * 37) % 61 + 1 for i in range(400)]
    random_batches = batch_order(400, 8, seed=0, epoch=0)
    grouped = batch_order(400, 8, seed=0, epoch=0, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert grouped == batch_order(400, 8, seed=0, epoch=0, lengths=lengths)
    assert grouped != batch_order(400, 8, seed=0, epoch=1, lengths=lengths)

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(grouped) < 0.7 * padded(random_batches)
    # Batches are shuffled after sorting, so long and short ones alternate across the epoch.
    first_half = [max(lengths[i] for i in b) for b in grouped[:25]]
    assert max(first_half) - min(first_half) > 30
    sampler = EpochBatchSampler(400, 8, seed=0, lengths=lengths)
    sampler.set_epoch(0, skip_batches=5)
    assert list(sampler) == grouped[5:]


def test_sampler_resumes_mid_epoch_with_the_same_batches():
    sampler = EpochBatchSampler(11, 4, seed=7)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(sampler) == 3 and full == batch_order(11, 4, seed=7, epoch=2)
    sampler.set_epoch(2, skip_batches=2)
    assert list(sampler) == full[2:] and len(sampler) == 1
    loader = torch.utils.data.DataLoader(list(range(100, 111)), batch_sampler=sampler)
    assert [b.tolist() for b in loader] == [[100 + i for i in full[2]]]
