"""The cohort dataset over tile + prior stores, and the (epoch, index) batch sampler."""

import numpy as np
import pytest
import torch
from helpers_toy import write_toy_cohort

from dirl import store
from dirl.errors import DirlError, StoreError
from dirl.ssl.data import CohortDataset, EpochBatchSampler, ViewConfig, resolve_n_classes


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_toy_cohort(tmp_path_factory.mktemp("cohort"), n_slides=2, n_tiles=6, tile_px=64)


def _ds(cohort, **kw):
    tiles, priors = cohort
    return CohortDataset(tiles, priors, 4, 16, ViewConfig(global_size=32, local_number=2, local_size=16), **kw)


def test_items(cohort):
    ds = _ds(cohort)
    # per slide: id, tiles, and the write ids of its tile and priors stores (a rewritten store is new data)
    assert len(ds) == 12 and [sig[:2] for sig in ds.signature()] == [["toy0", 6], ["toy1", 6]]
    assert all(len(sig) == 4 and sig[2] != sig[3] for sig in ds.signature())
    assert ds._open == {}  # nothing opened until an item is read (in the worker)
    it = ds[(0, 7)]
    assert it["global"].shape == (2, 3, 32, 32) and it["local"].shape == (2, 3, 16, 16)
    assert it["occupancy"].shape == (2, 4, 4) and torch.allclose(it["occupancy"].sum(-1), torch.ones(2, 4))
    assert it["overlap"].shape == (2, 4) and it["geometry"].shape == (2, 7) and int(it["index"]) == 7
    assert list(ds._open) == [1]  # handles of slide 1 only, kept for the next item
    again = ds[(0, 7)]
    assert all(torch.equal(it[k], again[k]) for k in it)
    assert not torch.equal(ds[(1, 7)]["global"], it["global"])  # another epoch, other views


def test_occupancy_matches_the_stored_map(cohort):
    tiles, priors = cohort
    ds = CohortDataset(tiles, priors, 4, 16, ViewConfig(global_size=64, global_scale=(1.0, 1.0), photometric=False))
    it = ds[(0, 2)]
    prior = torch.from_numpy(np.asarray(store.open_map(priors[0], "priors")[2]))
    # full-tile crop: only flips/rotations; the class areas are invariant to them
    total = it["occupancy"].sum(1)  # (2, C) in tokens
    expected = torch.bincount(prior.flatten().long(), minlength=4).float() / 256
    assert torch.allclose(total[0], expected) and torch.allclose(total[1], expected)
    assert torch.allclose(it["overlap"], torch.ones(2, 16))


def test_tiles_per_slide_cap(cohort):
    ds = _ds(cohort, tiles_per_slide=3)
    assert len(ds) == 6
    assert sorted(set(ds.rows[:, 0].tolist())) == [0, 1]
    assert np.array_equal(ds.rows, _ds(cohort, tiles_per_slide=3).rows)  # fixed subset


def test_n_classes_resolution(tmp_path, cohort):
    _, priors = cohort
    assert resolve_n_classes(priors, None) == 4
    assert resolve_n_classes(priors, 4) == 4
    with pytest.raises(DirlError, match="n-classes 5"):
        resolve_n_classes(priors, 5)
    _, bare = write_toy_cohort(tmp_path, n_slides=1, n_tiles=2, tile_px=32, write_n_classes=False)
    with pytest.raises(StoreError, match="--n-classes"):
        resolve_n_classes(bare, None)
    assert resolve_n_classes(bare, 4) == 4


def test_class_out_of_range_is_an_error(cohort):
    tiles, priors = cohort
    ds = CohortDataset(tiles, priors, 3, 16, ViewConfig(global_size=32))
    with pytest.raises(StoreError, match="n_classes = 3"):
        for i in range(len(ds)):
            ds[(0, i)]


def test_mismatched_inputs(cohort):
    tiles, priors = cohort
    with pytest.raises(DirlError, match="priors stores"):
        CohortDataset(tiles, priors[:1], 4, 16, ViewConfig(global_size=32))
    with pytest.raises(DirlError, match="multiple of the patch"):
        CohortDataset(tiles, priors, 4, 16, ViewConfig(global_size=40))


def test_sampler_ranks_partition_the_global_batch():
    single = list(EpochBatchSampler(22, 4, seed=1))
    ranks = [list(EpochBatchSampler(22, 4, world=2, rank=r, seed=1)) for r in range(2)]
    assert len(single) == 5 and all(len(b) == 4 for b in single)  # last incomplete batch dropped
    for step, batch in enumerate(single):
        assert sorted(batch) == sorted(ranks[0][step] + ranks[1][step])
    s = EpochBatchSampler(22, 4, seed=1)
    s.set_epoch(0, 3)
    assert list(s) == single[3:] and len(s) == 2
    s.set_epoch(1)
    other = list(s)
    assert other[0][0][0] == 1 and sorted(sum(other, [])) != sorted(sum(single, []))
    with pytest.raises(DirlError, match="fewer than one batch"):
        EpochBatchSampler(3, 4)
    with pytest.raises(DirlError, match="divisible"):
        EpochBatchSampler(30, 5, world=2)


def test_workers_give_the_same_batches(cohort):
    ds = _ds(cohort)

    def batches(workers):
        sampler = EpochBatchSampler(len(ds), 4, seed=0)
        dl = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, generator=torch.Generator())
        return [b["global"] for b in dl]

    a, b = batches(0), batches(2)
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
