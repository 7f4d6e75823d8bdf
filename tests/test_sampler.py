"""MixtureBatchSampler: weights, typed batches, length grouping, rank sharding, seeds, resume."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter

import pytest

from sphinx_mllm.data.sampler import MixtureBatchSampler, SourceLayout
from sphinx_mllm.utils import SphinxError


def layouts(*specs: tuple[int, str, float]) -> list[SourceLayout]:
    """Contiguous sources from (size, type, weight); item i has length i % 97 (varied, deterministic)."""
    out, offset = [], 0
    for size, kind, weight in specs:
        out.append(SourceLayout(offset, size, kind, weight, [(offset + j) * 37 % 97 for j in range(size)]))
        offset += size
    return out


def concat(lists) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


def source_of(index: int, sources: list[SourceLayout]) -> int:
    return next(s for s, src in enumerate(sources) if src.offset <= index < src.offset + src.size)


def test_weights_give_exact_item_counts_per_epoch():
    # weighted sizes: 100 * 1 = 100, 50 * 3 = 150, 200 * 0.25 = 50, 40 * 1.5 = 60; total 360 = 36 batches
    srcs = layouts((100, "t", 1.0), (50, "t", 3.0), (200, "t", 0.25), (40, "t", 1.5))
    sampler = MixtureBatchSampler(srcs, 10, batch_by_type=False)
    assert len(sampler) == 36
    seen = Counter(i for batch in sampler for i in batch)
    per_source = Counter()
    for i, n in seen.items():
        per_source[source_of(i, srcs)] += n
    assert per_source == {0: 100, 1: 150, 2: 50, 3: 60}
    assert all(seen[i] == 3 for i in range(100, 150))  # weight 3: every item exactly three times
    assert sorted(Counter(seen[i] for i in range(350, 390)).items()) == [(1, 20), (2, 20)]  # weight 1.5
    # weight < 1 draws another subset in another epoch
    sampler.set_epoch(1)
    other = {i for batch in sampler for i in batch if 150 <= i < 350}
    first = {i for i in seen if 150 <= i < 350}
    assert len(other) == len(first) == 50 and other != first


def test_measured_frequencies_follow_weights_over_many_batches():
    # 3 types of different sizes and weights, with drop: frequencies within 2% of size * weight shares
    srcs = layouts((300, "a", 1.0), (120, "b", 2.5), (500, "c", 0.2))
    expected = {0: 300, 1: 300, 2: 100}
    sampler = MixtureBatchSampler(srcs, 16, world_size=4, rank=0)
    counts, total = Counter(), 0
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in sampler.global_batches():
            for i in batch:
                counts[source_of(i, srcs)] += 1
                total += 1
    for s, weight in expected.items():
        assert counts[s] / total == pytest.approx(weight / 700, abs=0.02)


def test_batch_by_type_makes_every_global_batch_single_type():
    srcs = layouts((90, "text", 1.0), (70, "image_text", 1.0), (45, "image_text", 2.0))
    sampler = MixtureBatchSampler(srcs, 8, world_size=2, batch_by_type=True)
    types = [{srcs[source_of(i, srcs)].type for i in batch} for batch in sampler.global_batches()]
    assert all(len(t) == 1 for t in types)
    assert {next(iter(t)) for t in types} == {"text", "image_text"}
    # text: 90 // 8 = 11 batches; image_text: (70 + 90) // 8 = 20 batches (the rest is dropped)
    assert Counter(next(iter(t)) for t in types) == {"text": 11, "image_text": 20}
    mixed = MixtureBatchSampler(srcs, 8, world_size=2, batch_by_type=False)
    assert any(len({srcs[source_of(i, srcs)].type for i in b}) > 1 for b in mixed.global_batches())


def test_length_grouping_sorts_within_windows():
    srcs = layouts((400, "t", 1.0))
    length = dict(zip(range(400), srcs[0].lengths))
    # one window covering the whole pool: batches are consecutive runs of the sorted lengths
    whole = MixtureBatchSampler(srcs, 10, length_window=1000).global_batches()
    spans = sorted((min(length[i] for i in b), max(length[i] for i in b)) for b in whole)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in itertools.pairwise(spans))
    # windows of 4 batches: spread inside a batch far below that of random batches
    def spread(batches):
        return statistics.fmean(max(length[i] for i in b) - min(length[i] for i in b) for b in batches)
    grouped = MixtureBatchSampler(srcs, 10, length_window=4).global_batches()
    random_ = MixtureBatchSampler(srcs, 10, group_by_length=False).global_batches()
    assert spread(grouped) < 0.4 * spread(random_)
    assert sorted(i for b in grouped for i in b) == list(range(400))


def test_ranks_split_each_global_batch_without_overlap():
    srcs = layouts((101, "a", 1.0), (77, "b", 1.0))
    world = 4
    ranks = [MixtureBatchSampler(srcs, 8, world_size=world, rank=r, seed=3) for r in range(world)]
    per_rank = [list(s) for s in ranks]
    plan = ranks[0].global_batches()
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(plan) == len(ranks[2])
    for k, global_batch in enumerate(plan):
        parts = [per_rank[r][k] for r in range(world)]
        assert all(len(p) == 2 for p in parts)
        assert concat(parts) == global_batch
        assert len(set(concat(parts))) == 8


def test_drop_and_pad_of_the_last_partial_batch(caplog):
    srcs = layouts((25, "a", 1.0), (7, "b", 1.0))
    dropped = MixtureBatchSampler(srcs, 10, last_batch="drop")
    plan = dropped.global_batches()
    # a: 25 -> 2 full batches, 5 items dropped; b: 7 < 10 -> dropped whole, with a warning
    assert len(dropped) == len(plan) == 2
    assert all(0 <= i < 25 for b in plan for i in b) and len({i for b in plan for i in b}) == 20
    assert "type 'b' has 7 items, fewer than one step (10): dropped" in caplog.text
    padded = MixtureBatchSampler(srcs, 10, last_batch="pad")
    plan = padded.global_batches()
    assert len(padded) == len(plan) == 4  # a: 3 batches, b: 1 batch
    assert {i for b in plan for i in b} == set(range(32))
    assert all(len({srcs[source_of(i, srcs)].type for i in b}) == 1 for b in plan)  # pads stay in the type
    (b_batch,) = [b for b in plan if b[0] >= 25]
    assert len(b_batch) == 10 and set(b_batch) == set(range(25, 32))


def test_accumulation_steps_keep_one_type_per_optimizer_step():
    srcs = layouts((70, "a", 1.0), (50, "b", 1.0))
    sampler = MixtureBatchSampler(srcs, 6, world_size=3, accumulation_steps=3, seed=4)
    plan = sampler.global_batches()
    # steps of 18 items: a -> 3 steps, b -> 2 steps; 5 steps of 3 global batches each
    assert len(plan) == len(sampler) == 15 and all(len(b) == 6 for b in plan)
    for k in range(0, 15, 3):
        step_types = {srcs[source_of(i, srcs)].type for b in plan[k : k + 3] for i in b}
        assert len(step_types) == 1
    assert len({i for b in plan for i in b}) == 90


def test_same_seed_same_order_and_epoch_changes_it():
    srcs = layouts((200, "a", 1.0), (120, "b", 1.5))
    a = MixtureBatchSampler(srcs, 8, seed=7)
    b = MixtureBatchSampler(srcs, 8, seed=7)
    assert list(a) == list(b)
    assert MixtureBatchSampler(srcs, 8, seed=8).global_batches() != a.global_batches()
    epoch0 = a.global_batches()
    a.set_epoch(1)
    assert a.global_batches() != epoch0
    assert sorted(map(sorted, a.global_batches(epoch=0))) == sorted(map(sorted, epoch0))


def test_resume_mid_epoch_gives_the_remaining_batches():
    srcs = layouts((150, "a", 1.0), (90, "b", 0.5))
    full = MixtureBatchSampler(srcs, 6, world_size=2, rank=1, seed=5)
    full.set_epoch(2)
    uninterrupted = list(full)

    first = MixtureBatchSampler(srcs, 6, world_size=2, rank=1, seed=5)
    first.set_epoch(2)
    it = iter(first)
    done = [next(it) for _ in range(4)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["position"] == 4

    resumed = MixtureBatchSampler(srcs, 6, world_size=2, rank=1, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop calls it again: the position is kept
    assert len(resumed) == len(uninterrupted) - 4
    assert done + list(resumed) == uninterrupted
    resumed.set_epoch(3)  # the next epoch starts at its beginning
    assert len(list(resumed)) == len(uninterrupted)


def test_resume_with_another_world_size_at_the_same_global_batch():
    srcs = layouts((160, "a", 1.0), (96, "b", 1.0))
    plan = MixtureBatchSampler(srcs, 8, seed=1).global_batches()
    two = [MixtureBatchSampler(srcs, 8, world_size=2, rank=r, seed=1) for r in range(2)]
    iters = [iter(s) for s in two]
    for _ in range(5):
        for it in iters:
            next(it)
    state = two[0].state_dict()
    four = [MixtureBatchSampler(srcs, 8, world_size=4, rank=r, seed=1) for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    remaining = [list(s) for s in four]
    assert all(len(r) == len(plan) - 5 for r in remaining)
    for k in range(len(plan) - 5):
        assert concat(remaining[r][k] for r in range(4)) == plan[5 + k]


def test_state_dict_with_consumed_batches_and_mismatches():
    srcs = layouts((64, "a", 1.0))
    s = MixtureBatchSampler(srcs, 8, seed=2)
    list(s)
    state = s.state_dict(consumed_batches=3)  # a prefetching loader handed out more than was trained on
    r = MixtureBatchSampler(srcs, 8, seed=2)
    r.load_state_dict(state)
    assert list(r) == s.global_batches()[3:]
    with pytest.raises(SphinxError, match="global_batch_size"):
        MixtureBatchSampler(srcs, 16, seed=2).load_state_dict(state)
    with pytest.raises(SphinxError, match="data mixture"):
        MixtureBatchSampler(layouts((65, "a", 1.0)), 8, seed=2).load_state_dict(state)
    with pytest.raises(SphinxError, match="consumed_batches"):
        s.state_dict(consumed_batches=9)


def test_bad_arguments_are_clear_errors():
    srcs = layouts((10, "a", 1.0))
    with pytest.raises(SphinxError, match="multiple of the world size"):
        MixtureBatchSampler(srcs, 10, world_size=4)
    with pytest.raises(SphinxError, match="rank"):
        MixtureBatchSampler(srcs, 8, world_size=2, rank=2)
    with pytest.raises(SphinxError, match="last_batch"):
        MixtureBatchSampler(srcs, 8, last_batch="keep")  # type: ignore[arg-type]
    with pytest.raises(SphinxError, match="weight"):
        SourceLayout(0, 5, "a", 0.0)


def test_works_as_torch_dataloader_batch_sampler():
    torch = pytest.importorskip("torch")
    srcs = layouts((30, "a", 1.0), (20, "b", 1.0))
    sampler = MixtureBatchSampler(srcs, 10, world_size=2, rank=0)
    data = list(range(50))
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    batches = [b.tolist() for b in loader]
    assert len(loader) == len(batches) == 5
    assert batches == [b[:5] for b in sampler.global_batches()]
