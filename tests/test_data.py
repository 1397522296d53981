"""FT_Dataset semantics (REFERENCE 3.3 and Appendix A), the truncation fix (Q7), batching and sharding."""

from __future__ import annotations

import pytest
import torch

from steps.common import InputError
from steps.data import build_example, collate, epoch_batches, load_encoded, shard_sequential

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


def test_epoch_batches_match_distributed_sampler_and_cover_every_example():
    n, bs = 23, 4
    single = epoch_batches(n, bs, world_size=1, rank=0, seed=110, epoch=1)
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(111)).tolist()
    assert [i for b in single for i in b][:n] == expected
    assert len(single) == 6 and all(len(b) == bs for b in single)
    ranks = [epoch_batches(n, 2, world_size=2, rank=r, seed=110, epoch=1) for r in (0, 1)]
    first_rounds = [sorted(ranks[0][k] + ranks[1][k]) for k in range(len(ranks[0]))]
    assert first_rounds[0] == sorted(expected[:4])  # 2 ranks x batch 2 see the same 4 examples as 1 rank x batch 4
    assert epoch_batches(n, bs, 1, 0, 110, 2) != single


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
