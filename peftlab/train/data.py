"""Dataset files -> formatted, tokenized, masked (and optionally packed) examples.

    cfg = DataConfig(train="train.jsonl", format="alpaca", max_seq_len=512)
    data = prepare_data(cfg, tokenizer)
    collate = Collator.for_tokenizer(tokenizer)
    sampler = EpochBatchSampler(len(data.train), 8, seed=cfg.seed, lengths=data.train.lengths)
    loader = DataLoader(data.train, batch_sampler=sampler, collate_fn=collate)

Causal-LM formats (alpaca, chat, text, prompt_completion) give `input_ids` and `labels`,
with labels -100 on the prompt unless `train_on_inputs`; the classification format gives
`input_ids` (+ `token_type_ids`) and an integer label. All problems with the data raise
`DataError`, one sentence naming the file, line and field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from peftlab.train import formats
from peftlab.train.batching import (
    IGNORE_INDEX,
    Collator,
    EpochBatchSampler,
    batch_order,
    pack_examples,
)
from peftlab.train.formats import LabelMap
from peftlab.train.records import DataError, Record, load_records, split_eval

__all__ = ["DataConfig", "DataError", "PreparedData", "TokenizedDataset", "Collator",
           "EpochBatchSampler", "LabelMap", "Record", "batch_order", "load_records",
           "pack_examples", "prepare_data", "split_eval", "tokenize_records", "IGNORE_INDEX"]

FORMATS = tuple(formats.FIELDS)
Source = str | Path | Sequence[str | Path | dict]


@dataclass
class DataConfig:
    """What to read and how to turn it into training examples (the `data:` section of a run config)."""

    train: Source
    eval: Source | None = None
    eval_fraction: float = 0.0          # carve eval from train when no eval file is given
    format: str = "alpaca"              # alpaca | chat | text | prompt_completion | classification
    fields: dict[str, str] = field(default_factory=dict)   # canonical field -> column name
    max_seq_len: int = 512
    train_on_inputs: bool = False       # also put loss on prompts / user turns
    add_eos: bool = True                # end each non-chat causal example with EOS
    packing: bool = False               # causal LM only; see batching.py for attention handling
    use_chat_template: bool = False     # render alpaca / prompt_completion as a two-turn chat
    chat_template: str | None = None    # Jinja template used instead of the tokenizer's
    labels: list[str] | dict[str, int] | None = None   # classification names, or name -> id
    num_labels: int | None = None       # classification with integer labels
    split: str | None = None            # split of a saved DatasetDict folder for train
    eval_split: str | None = None       # ... and for eval
    seed: int = 0                       # for eval_fraction

    def __post_init__(self) -> None:
        self.fields = dict(self.fields or {})
        if self.format not in FORMATS:
            raise DataError(f"format: unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        formats.check_fields(self.format, self.fields)
        if self.max_seq_len < 2:
            raise DataError(f"max_seq_len must be at least 2, got {self.max_seq_len}")
        if self.eval is not None and self.eval_fraction:
            raise DataError("give either an eval file or eval_fraction, not both")
        if self.packing and self.format == "classification":
            raise DataError("packing applies to causal-LM formats only; set packing: false for classification")

    @property
    def is_causal(self) -> bool:
        """True for formats that train a causal language model."""
        return self.format in formats.CAUSAL_FORMATS


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized examples (dicts of token-id lists) with the counts of how they were made."""

    def __init__(self, examples: list[dict], stats: dict[str, Any]):
        self.examples, self.stats = examples, stats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        """Tokens per example, for length-grouped batches (`EpochBatchSampler(lengths=...)`)."""
        return [len(e["input_ids"]) for e in self.examples]


@dataclass
class PreparedData:
    """Train (and eval) datasets; `label_names` is set for classification (index = class id)."""

    train: TokenizedDataset
    eval: TokenizedDataset | None
    label_names: list[str] | None = None


def prepare_data(config: DataConfig, tokenizer: Any) -> PreparedData:
    """Load, split, format, tokenize and (optionally) pack the train and eval data."""
    train_records = load_records(config.train, split=config.split)
    eval_records = None
    if config.eval is not None:
        eval_records = load_records(config.eval, split=config.eval_split)
    elif config.eval_fraction:
        train_records, eval_records = split_eval(train_records, config.eval_fraction, config.seed)
    label_map = _label_map(config, train_records) if config.format == "classification" else None
    train = tokenize_records(train_records, config, tokenizer, label_map, name="train")
    evaluation = None
    if eval_records is not None:
        evaluation = tokenize_records(eval_records, config, tokenizer, label_map, name="eval")
    return PreparedData(train, evaluation, label_map.names if label_map else None)


def _label_map(config: DataConfig, records: list[Record]) -> LabelMap:
    if isinstance(config.labels, dict):
        return LabelMap(by_name=config.labels)
    if config.labels is not None:
        return LabelMap(names=[str(n) for n in config.labels])
    if config.num_labels is not None:
        return LabelMap(names=[str(i) for i in range(config.num_labels)])
    values = [formats.get_field(r, "label", config.fields, "classification", kinds=(str, int))
              for r in records]
    return LabelMap.infer(values, [r.origin for r in records])


def tokenize_records(records: list[Record], config: DataConfig, tokenizer: Any,
                     label_map: LabelMap | None = None, name: str = "train") -> TokenizedDataset:
    """Format and tokenize records; drops causal examples left with nothing to learn."""
    if config.format == "classification":
        if label_map is None:
            label_map = _label_map(config, records)
        examples, stats = _classification_examples(records, config, tokenizer, label_map)
    else:
        examples, stats = _causal_examples(records, config, tokenizer)
    if not examples:
        where = _sources(records)
        raise DataError(f"{name} data ({where}): empty after truncation/filtering: none of its "
                        f"{len(records)} examples keeps a trained token within max_seq_len "
                        f"{config.max_seq_len}; raise max_seq_len, shorten the prompts, or set train_on_inputs")
    if config.packing:
        examples = pack_examples(examples, config.max_seq_len)
        stats["blocks"] = len(examples)
        stats["packing_efficiency"] = round(stats["tokens"] / (len(examples) * config.max_seq_len), 4)
    return TokenizedDataset(examples, stats)


def _sources(records: list[Record]) -> str:
    files = dict.fromkeys("records" if r.origin.startswith("record ") else r.origin.split(", ")[0]
                          for r in records)
    return ", ".join(list(files)[:3]) + (", ..." if len(files) > 3 else "")


def _segments(record: Record, config: DataConfig, tokenizer: Any) -> tuple[formats.Segments, bool]:
    """Segments of one record, and whether they came from a chat template (which ends turns itself)."""
    fmt, fields = config.format, config.fields
    if fmt == "chat" or (config.use_chat_template and fmt in ("alpaca", "prompt_completion")):
        to_messages = {"chat": formats.chat_messages, "alpaca": formats.alpaca_messages,
                       "prompt_completion": formats.prompt_completion_messages}[fmt]
        messages = to_messages(record, fields)
        if config.train_on_inputs:   # every token is trained: no need to find the turns
            return [(formats.render_chat(messages, tokenizer, record.origin, config.chat_template), True)], True
        return formats.chat_segments(messages, tokenizer, record.origin, config.chat_template), True
    to_segments = {"alpaca": formats.alpaca_segments, "text": formats.text_segments,
                   "prompt_completion": formats.prompt_completion_segments}[fmt]
    return to_segments(record, fields), False


def _check_tokenizer(config: DataConfig, tokenizer: Any) -> None:
    uses_template = config.format == "chat" or config.use_chat_template
    if uses_template and not (config.chat_template or getattr(tokenizer, "chat_template", None)):
        who = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"format '{config.format}' with a chat template needs one, but tokenizer '{who}' "
                        "has none; set chat_template (a Jinja string) in the data config")
    if config.add_eos and not uses_template and tokenizer.eos_token_id is None:
        raise DataError("add_eos: the tokenizer has no eos_token; set one on the tokenizer or add_eos: false")


def _special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before text by default (a BOS token for Llama-style models)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def _causal_examples(records: list[Record], config: DataConfig, tokenizer: Any
                     ) -> tuple[list[dict], dict[str, Any]]:
    _check_tokenizer(config, tokenizer)
    formatted = [_segments(r, config, tokenizer) for r in records]
    texts = [text for segments, _ in formatted for text, _ in segments]
    ids_iter = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    prefix = _special_prefix(tokenizer)
    examples, dropped, truncated, trained = [], 0, 0, 0
    for segments, from_template in formatted:
        input_ids = [] if from_template else list(prefix)
        labels = [IGNORE_INDEX] * len(input_ids)
        for _, trainable in segments:
            ids = next(ids_iter)
            input_ids += ids
            labels += ids if (trainable or config.train_on_inputs) else [IGNORE_INDEX] * len(ids)
        if config.add_eos and not from_template:
            input_ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        if len(input_ids) > config.max_seq_len:
            truncated += 1
            input_ids, labels = input_ids[:config.max_seq_len], labels[:config.max_seq_len]
        labels[0] = IGNORE_INDEX   # no token predicts the first one
        scored = sum(label != IGNORE_INDEX for label in labels)
        if scored == 0:
            dropped += 1
            continue
        trained += scored
        examples.append({"input_ids": input_ids, "labels": labels})
    stats = {"records": len(records), "examples": len(examples), "dropped": dropped,
             "truncated": truncated, "tokens": sum(len(e["input_ids"]) for e in examples),
             "trained_tokens": trained}
    return examples, stats


def _classification_examples(records: list[Record], config: DataConfig, tokenizer: Any,
                             label_map: LabelMap) -> tuple[list[dict], dict[str, Any]]:
    fields = config.fields
    texts, pairs, labels = [], [], []
    for r in records:
        texts.append(formats.get_field(r, "text", fields, "classification"))
        pairs.append(formats.get_field(r, "text_pair", fields, "classification"))
        value = formats.get_field(r, "label", fields, "classification", kinds=(str, int))
        labels.append(label_map.id_of(value, r.origin))
    encoded: list[dict | None] = [None] * len(records)
    # A tokenizer call takes either all pairs or none, so encode the two kinds separately.
    for has_pair in (False, True):
        index = [i for i, p in enumerate(pairs) if (p is not None) == has_pair]
        if not index:
            continue
        out = tokenizer([texts[i] for i in index], [pairs[i] for i in index] if has_pair else None,
                        truncation=True, max_length=config.max_seq_len)
        for row, i in enumerate(index):
            encoded[i] = {key: out[key][row] for key in ("input_ids", "token_type_ids") if key in out}
    examples = [dict(e, labels=label) for e, label in zip(encoded, labels)]
    stats = {"records": len(records), "examples": len(examples), "dropped": 0,
             "at_max_seq_len": sum(len(e["input_ids"]) == config.max_seq_len for e in examples),
             "tokens": sum(len(e["input_ids"]) for e in examples), "num_labels": label_map.num_labels}
    return examples, stats
