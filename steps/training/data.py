"""Encoded JSONL -> training examples and batches, with the original FT_Dataset's semantics.

An example is the token sequence `context + completion` with, at every position t, the target token t+1 and a
loss-mask bit. Batches are padded to their own longest sequence, not to --seq_len as the original did; the
`fixed` pad mode keeps the original's padding for comparisons. Each process of a distributed run takes
its own slice of a seeded per-epoch permutation, exactly as torch's DistributedSampler would.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from steps.core.common import InputError, iter_jsonl
from steps.formats.encoded_meta import check_same_encoding

MicroBatch = list[int]  # indices into the training examples
Update = list[MicroBatch]  # the grad_acc micro-batches of one optimizer update, for one rank
EpochPlan = list[Update]  # one rank's updates for one epoch, in order


@dataclass(frozen=True)
class Example:
    input: list[int]
    target: list[int]
    mask: list[int]
    truncated: bool = False


def load_encoded(path: str | os.PathLike, vocab_size: int = 50257) -> list[tuple[list[int], list[int]]]:
    """Read `{"context": [ids], "completion": [ids]}` lines, checking types and id range before any compute."""
    pairs = []
    for line, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("context"), list) or not isinstance(obj.get("completion"), list):
            raise InputError('expected {"context": [token ids], "completion": [token ids]} (run steps.encode first)', path, line)
        for key in ("context", "completion"):
            ids = obj[key]
            bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InputError(f"{key} holds {bad!r}, not a token id in [0, {vocab_size}); was it encoded for another vocabulary?", path, line)
        if not obj["completion"]:
            raise InputError("empty completion: nothing to learn from this line", path, line)
        pairs.append((obj["context"], obj["completion"]))
    if not pairs:
        raise InputError("no examples in file (it is empty)", path)
    return pairs


def build_example(context: list[int], completion: list[int], seq_len: int, obj: str = "clm", truncation: str = "fix") -> Example:
    """input/target/mask for one pair, unpadded (the original's layout with no prefix/infix tokens).

    `clm` trains only the completion targets (the final EOS included); `jlm` every next token.
    Truncation when the pair is longer than seq_len: `fix` drops context tokens from the left so every
    completion target is still trained; `reference` keeps the first seq_len tokens as the original did, which
    loses the last target and, when the context alone fills seq_len, the whole example.
    """
    seq = context + completion
    truncated = len(seq) > seq_len
    if truncated and truncation == "fix":
        keep_completion = min(len(completion), seq_len - 1)
        keep_context = seq_len - keep_completion
        context, completion = context[len(context) - keep_context :], completion[:keep_completion]
        seq = context + completion
    n = min(len(seq), seq_len)
    inputs = seq[:n]
    targets = (seq[1 : n + 1] + [0])[:n]  # position t predicts token t+1; the last real token predicts padding
    if obj == "jlm":
        mask = [1] * (n - 1) + [0]
    else:  # the ones sit exactly where the target is a completion token (when nothing was cut from the end)
        mask = ([0] * max(0, len(context) - 1) + [1] * max(0, n - len(context)) + [0] * n)[:n]
    return Example(inputs, targets, mask, truncated)


def build_examples(pairs: list[tuple[list[int], list[int]]], seq_len: int, obj: str = "clm", truncation: str = "fix") -> list[Example]:
    return [build_example(c, p, seq_len, obj, truncation) for c, p in pairs]


def collate(examples: list[Example], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad with zeros to the batch's longest example (or to `pad_to`): harmless under causal attention."""
    length = pad_to or max(len(e.input) for e in examples)
    batch = {"input": torch.zeros(len(examples), length, dtype=torch.long),
             "target": torch.zeros(len(examples), length, dtype=torch.long),
             "mask": torch.zeros(len(examples), length)}
    for row, e in enumerate(examples):
        n = len(e.input)
        batch["input"][row, :n] = torch.tensor(e.input)
        batch["target"][row, :n] = torch.tensor(e.target)
        batch["mask"][row, :n] = torch.tensor(e.mask, dtype=torch.float)
    # Flat indices of the loss positions, computed here on the host so the loss never asks the device
    # which positions are on (a boolean index would force a GPU->CPU sync every micro-batch).
    batch["positions"] = batch["mask"].view(-1).nonzero().squeeze(1)
    return batch


def require_examples_for_update(n_examples: int, world_size: int, batch_size: int, grad_acc: int, source: str | os.PathLike) -> None:
    """An update takes world x batch x grad_acc examples: more than the training set would repeat examples in every
    update (and a huge one, --grad_acc 1e12, could not even be planned)."""
    if (per_update := world_size * batch_size * grad_acc) > n_examples:
        raise InputError(f"an update of {world_size} process(es) x --train_batch_size {batch_size} x --grad_acc {grad_acc} = "
                         f"{per_update:,} examples is more than the {n_examples:,} training examples; lower --train_batch_size "
                         "or --grad_acc", source)


def epoch_updates(
    lengths: list[int], batch_size: int, world_size: int, rank: int, seed: int, epoch: int,
    grad_acc: int = 1, bucket_window: int = 0,
) -> EpochPlan:
    """This rank's work for one epoch: a list of updates, each a list of `grad_acc` micro-batches of indices.

    The order is torch's `randperm` seeded with seed + epoch, and rank r takes every world-th index of each
    round, exactly as DistributedSampler. Instead of the original's random fill from a private RNG whose state
    drifts from run to run, the last partial update is filled with indices drawn from the same seeded generator, so the
    order depends only on (seed, epoch) and a resumed run sees exactly the same batches.

    With `bucket_window` > 0, each window of that many examples is sorted by length before being cut into
    updates, and the updates are then shuffled: batches hold similar lengths, so little compute goes to padding.
    An update always takes world * batch * grad_acc consecutive examples of the order, so 2 processes x batch 4,
    1 process x batch 8 and batch 4 x grad_acc 2 train on exactly the same examples in each update.
    """
    n = len(lengths)
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    per_update = world_size * batch_size * grad_acc
    total = math.ceil(n / per_update) * per_update
    order += torch.randint(n, (total - n,), generator=generator).tolist()
    updates = [order[i : i + per_update] for i in range(0, total, per_update)]
    if bucket_window > 0:
        window = max(1, bucket_window // per_update) * per_update
        by_length = []
        for start in range(0, total, window):
            by_length += sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        updates = [by_length[i : i + per_update] for i in range(0, total, per_update)]
        updates = [updates[i] for i in torch.randperm(len(updates), generator=generator).tolist()]
    per_micro = world_size * batch_size
    return [
        [update[k * per_micro : (k + 1) * per_micro][rank::world_size] for k in range(grad_acc)]
        for update in updates
    ]


def shard_sequential(n_examples: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """Validation batches: contiguous shards, no duplicates, no padding examples (the original's sampler repeated
    examples to fill the last round); the last batch may be short."""
    per_rank = math.ceil(n_examples / world_size)
    indices = list(range(rank * per_rank, min(n_examples, (rank + 1) * per_rank)))
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def load_splits(train_path: str, valid_path: str, seq_len: int, obj: str, truncation: str,
                vocab_size: int) -> tuple[list[Example], list[Example]]:
    """Training and validation examples; validation always uses the clm objective, as the original."""
    check_same_encoding(train_path, valid_path)
    train = build_examples(load_encoded(train_path, vocab_size), seq_len, obj, truncation)
    valid = build_examples(load_encoded(valid_path, vocab_size), seq_len, "clm", truncation)
    for name, examples, path, objective in (("training", train, train_path, obj), ("validation", valid, valid_path, "clm")):
        if not any(any(e.mask) for e in examples):
            # Otherwise the loss is 0/0: a "perfect" valid loss of 0.0 and an untrained adapter saved as best.
            raise InputError(f"no {name} example has a token to learn from with --seq_len {seq_len} and --obj {objective}; "
                             "raise --seq_len above the context lengths", path)
    return train, valid
