"""FT_Dataset semantics (the original's example layout and schedules), the truncation fix, batching and sharding."""

from __future__ import annotations

import pytest
import torch

from steps.core.common import InputError
from steps.training.data import build_example, collate, epoch_updates, load_encoded, shard_sequential

CONTEXT, COMPLETION = [10, 11, 12, 50256], [20, 21, 50256]


def test_reference_worked_example_fixed_padding():
    example = build_example(CONTEXT, COMPLETION, seq_len=10)
    batch = collate([example], pad_to=10)
    assert batch["input"][0].tolist() == [10, 11, 12, 50256, 20, 21, 50256, 0, 0, 0]
    assert batch["target"][0].tolist() == [11, 12, 50256, 20, 21, 50256, 0, 0, 0, 0]
    assert batch["mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]


def test_reference_truncation_reproduces_the_original_masks():
    clm = build_example(CONTEXT, COMPLETION, seq_len=5, truncation="reference")
    jlm = build_example(CONTEXT, COMPLETION, seq_len=5, obj="jlm", truncation="reference")
    assert clm.mask == [0, 0, 0, 1, 0]
    assert jlm.mask == [1, 1, 1, 1, 0]
    assert clm.input == [10, 11, 12, 50256, 20]
    starved = build_example(list(range(1, 9)), COMPLETION, seq_len=5, truncation="reference")
    assert sum(starved.mask) == 0  # the original silently trains nothing on such an example


def test_truncation_fix_keeps_every_completion_target():
    e = build_example(CONTEXT, COMPLETION, seq_len=5)
    assert e.truncated
    assert e.input == [12, 50256, 20, 21, 50256]
    trained = [t for t, m in zip(e.target, e.mask) if m]
    assert trained == COMPLETION
    long_context = build_example(list(range(1, 40)), COMPLETION, seq_len=8)
    assert [t for t, m in zip(long_context.target, long_context.mask) if m] == COMPLETION


def test_clm_mask_marks_exactly_the_completion_targets():
    for seq_len in (7, 50):
        e = build_example(CONTEXT, COMPLETION, seq_len)
        assert [t for t, m in zip(e.target, e.mask) if m] == COMPLETION
        assert len(e.input) == 7  # no padding until collate


def test_dynamic_padding_pads_to_the_longest_in_batch():
    short = build_example([1, 50256], [2, 50256], 512)
    long = build_example(CONTEXT, COMPLETION, 512)
    batch = collate([short, long])
    assert batch["input"].shape == (2, 7)
    assert batch["mask"][0].tolist() == [0, 1, 1, 0, 0, 0, 0]


def flat(updates):
    return [i for update in updates for micro in update for i in micro]


def test_epoch_updates_follow_distributed_sampler_order_and_cover_every_example():
    n, bs = 23, 4
    single = epoch_updates([5] * n, bs, world_size=1, rank=0, seed=110, epoch=1)
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(111)).tolist()
    assert flat(single)[:n] == expected
    assert len(single) == 6 and all(len(u) == 1 and len(u[0]) == bs for u in single)
    assert epoch_updates([5] * n, bs, 1, 0, 110, 2) != single


@pytest.mark.parametrize("bucket_window", [0, 16])
def test_world_batch_and_grad_acc_splits_see_the_same_examples_per_update(bucket_window):
    lengths = [(7 * i) % 13 + 1 for i in range(37)]
    one = epoch_updates(lengths, 8, 1, 0, seed=3, epoch=1, bucket_window=bucket_window)
    two = [epoch_updates(lengths, 4, 2, r, seed=3, epoch=1, bucket_window=bucket_window) for r in (0, 1)]
    acc = epoch_updates(lengths, 4, 1, 0, seed=3, epoch=1, grad_acc=2, bucket_window=bucket_window)
    for k, update in enumerate(one):
        assert sorted(update[0]) == sorted(two[0][k][0] + two[1][k][0]) == sorted(acc[k][0] + acc[k][1])


def test_bucketing_groups_similar_lengths():
    lengths = [i % 50 + 1 for i in range(400)]
    plain = epoch_updates(lengths, 8, 1, 0, seed=0, epoch=1)
    bucketed = epoch_updates(lengths, 8, 1, 0, seed=0, epoch=1, bucket_window=200)
    def padding(updates):
        return sum(max(lengths[i] for i in u[0]) * 8 - sum(lengths[i] for i in u[0]) for u in updates)
    assert padding(bucketed) < padding(plain) / 4
    assert sorted(flat(bucketed)) == sorted(flat(plain))  # same examples, different grouping


def test_validation_shards_cover_each_example_once():
    shards = [shard_sequential(11, 3, world_size=3, rank=r) for r in range(3)]
    flat = [i for shard in shards for batch in shard for i in batch]
    assert sorted(flat) == list(range(11))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"context": [1, 2]}', "expected"),
        ('{"context": [1, 2], "completion": [3, 99999]}', "not a token id"),
        ('{"context": [1, 2], "completion": [3, -1]}', "not a token id"),
        ("{not json", "malformed JSON"),
        ('{"context": [1], "completion": []}', "empty completion"),
    ],
)
def test_bad_encoded_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text('{"context": [1, 2], "completion": [3]}\n' + line + "\n")
    with pytest.raises(InputError, match=message) as info:
        load_encoded(path)
    assert f"{path}:2:" in str(info.value)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(InputError, match="empty"):
        load_encoded(path)
