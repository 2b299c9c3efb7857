"""From tokenized examples to batches: packing, padding, and a reproducible batch order.

Packing places whole examples one after another into blocks of at most `max_seq_len`
tokens (next-fit, in dataset order; an example never straddles two blocks). Each block
carries `position_ids` that restart at 0 for every example and no `attention_mask`.
transformers 5 (`masking_utils`; checked with 5.23) reads such restarts as packed
sequences and builds a block-diagonal causal mask for eager/SDPA/flex attention, and
FlashAttention-2 takes them as variable-length boundaries: no example attends to another,
and each is scored exactly as if it were alone (tested against separate runs).
That detection is skipped when the call carries a KV cache, so train with
`model(**batch, use_cache=False)` (or `model.config.use_cache = False`): with the default
cache, and for models whose attention does not use those mask utilities, a packed block
is plain concatenation and tokens attend to earlier examples in the same block.
The first token of every example is never a target, so no example learns to predict
the start of the next.
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

IGNORE_INDEX = -100   # label value that cross-entropy in transformers skips
_PAD_VALUES = {"labels": IGNORE_INDEX, "token_type_ids": 0, "attention_mask": 0}
GROUP_WINDOW = 50   # batches sorted together when grouping by length


def pack_examples(examples: Sequence[dict], max_seq_len: int) -> list[dict]:
    """Concatenate whole causal-LM examples into blocks of at most `max_seq_len` tokens."""
    blocks: list[dict] = []
    current: dict = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        if len(ids) > max_seq_len:
            raise ValueError(f"example of {len(ids)} tokens is longer than max_seq_len {max_seq_len}")
        if len(current["input_ids"]) + len(ids) > max_seq_len:
            blocks.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX] + list(labels[1:])
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        blocks.append(current)
    return blocks


class Collator:
    """Pads a list of examples into a dict of tensors ready for `model(**batch)`.

    Padding goes to the right by default (`padding_side="left"` for generation-style
    batches); padded label positions are -100 and `attention_mask` is 0 there. Packed
    examples (those with `position_ids`) get no `attention_mask`; their padding forms its
    own run of positions 0, 1, ... so it stays a separate, unscored sequence.
    Integer `labels` (classification) are stacked into a 1-D tensor.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, tokenizer, padding_side: str = "right", pad_to_multiple_of: int | None = None
                      ) -> "Collator":
        """A collator padding with the tokenizer's pad token (its EOS token, or 0, if it has none)."""
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        return cls(pad, padding_side, pad_to_multiple_of)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in examples[0]
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            if key == "labels" and isinstance(examples[0]["labels"], int):
                batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
                continue
            batch[key] = torch.tensor([self._pad(e[key], key, length) for e in examples], dtype=torch.long)
        if not packed:
            batch["attention_mask"] = torch.tensor(
                [self._pad([1] * len(e["input_ids"]), "attention_mask", length) for e in examples],
                dtype=torch.long)
        return batch

    def _pad(self, values: Sequence[int], key: str, length: int) -> list[int]:
        missing = length - len(values)
        if key == "position_ids":
            filler = list(range(missing))
        else:
            filler = [_PAD_VALUES.get(key, self.pad_token_id)] * missing
        return list(values) + filler if self.padding_side == "right" else filler + list(values)


def batch_order(num_examples: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                drop_last: bool = False, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """The example indices of every batch of one epoch, a pure function of its arguments.

    The shuffle uses Python's own Mersenne Twister seeded from the string 'seed:epoch', so
    the order is the same on every machine and run: resuming at step k of an epoch means
    taking `batch_order(...)[k:]`. With `lengths` (tokens per example), batches hold
    examples of similar length, which saves the compute spent on padding: each window of
    `GROUP_WINDOW` shuffled batches is sorted by length, cut into batches, and the batches
    are shuffled again.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if lengths is not None and len(lengths) != num_examples:
        raise ValueError(f"lengths has {len(lengths)} entries for {num_examples} examples")
    rng = random.Random(f"batches:{seed}:{epoch}")
    order = list(range(num_examples))
    if shuffle:
        rng.shuffle(order)
    if lengths is not None:
        window = GROUP_WINDOW * batch_size
        order = [i for start in range(0, num_examples, window)
                 for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if lengths is not None and shuffle:
        rng.shuffle(batches)   # else every window would run from its longest batch to its shortest
    return batches


class EpochBatchSampler(torch.utils.data.Sampler):
    """A `DataLoader` batch sampler over `batch_order`, resumable mid-epoch.

    Call `set_epoch(epoch, skip_batches=k)` before iterating; it then yields the batches of
    that epoch from the k-th on, exactly those an uninterrupted run would have seen.
    Pass `lengths` (e.g. `TokenizedDataset.lengths`) to group examples of similar length.
    """

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_last: bool = False, lengths: Sequence[int] | None = None):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.shuffle, self.drop_last, self.lengths = shuffle, drop_last, lengths
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch to iterate and how many of its first batches were already consumed."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = batch_order(self.num_examples, self.batch_size, seed=self.seed, epoch=self.epoch,
                              shuffle=self.shuffle, drop_last=self.drop_last, lengths=self.lengths)
        return iter(batches[self.skip_batches:])

    def __len__(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return max(0, full + (1 if rest and not self.drop_last else 0) - self.skip_batches)
