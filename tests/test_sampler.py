import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metamap.errors import EpisodeError
from metamap.tasks.batch import TaskBatch
from metamap.tasks.sampler import EpisodeSampler, shard


def test_shapes_labels_and_classes(tiny_dataset):
    b = EpisodeSampler(tiny_dataset, ways=4, shots=2, queries=3, tasks_per_batch=5, seed=1).batch(0)
    assert b.support_x.shape == (5, 8, 1, 8, 8) and b.query_x.shape == (5, 12, 1, 8, 8)
    assert b.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert b.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert b.classes.shape == (5, 4) and b.ways == 4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ways=st.integers(2, 12), shots=st.integers(1, 3), queries=st.integers(1, 2),
       seed=st.integers(0, 2**31), index=st.integers(0, 10**6))
def test_invariants(tiny_dataset, ways, shots, queries, seed, index):
    s = EpisodeSampler(tiny_dataset, ways, shots, queries, tasks_per_batch=2, seed=seed)
    for t in range(2):
        picks, classes = s.task_indices(index, t)
        assert len(set(classes.tolist())) == ways                          # distinct classes
        assert len(set(picks.flatten().tolist())) == ways * (shots + queries)  # support and query disjoint
        labels = tiny_dataset.labels[torch.from_numpy(picks)]
        assert (labels == torch.from_numpy(classes)[:, None]).all()       # every pick of its class


def test_same_seed_same_episodes_different_seed_different(tiny_dataset):
    a = EpisodeSampler(tiny_dataset, 5, 1, 2, 3, seed=7).batch(11)
    b = EpisodeSampler(tiny_dataset, 5, 1, 2, 3, seed=7).batch(11)
    c = EpisodeSampler(tiny_dataset, 5, 1, 2, 3, seed=8).batch(11)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.classes, b.classes)
    assert not torch.equal(a.classes, c.classes)


def test_ranks_share_a_batch_exactly(tiny_dataset):
    s = EpisodeSampler(tiny_dataset, 3, 1, 1, tasks_per_batch=5, seed=3)
    whole = s.batch(4)
    parts = TaskBatch.cat([s.batch(4, rank=r, world_size=2) for r in range(2)])
    assert torch.equal(whole.query_x, parts.query_x) and torch.equal(whole.classes, parts.classes)
    assert [len(shard(5, r, 2)) for r in range(2)] == [2, 3]


def test_evaluation_episodes_do_not_depend_on_chunking(tiny_dataset):
    s = EpisodeSampler(tiny_dataset, 3, 1, 2, seed=5)
    all_at_once = s.episodes(range(6))
    chunked = TaskBatch.cat([s.episodes(range(0, 4)), s.episodes(range(4, 6))])
    assert torch.equal(all_at_once.support_x, chunked.support_x)


def test_global_rng_is_not_used(tiny_dataset):
    s = EpisodeSampler(tiny_dataset, 3, 1, 2, seed=5)
    torch.manual_seed(0)
    np.random.seed(0)
    a = s.batch(0)
    torch.manual_seed(1)
    np.random.seed(1)
    assert torch.equal(a.support_x, s.batch(0).support_x)


@pytest.mark.parametrize("kw, words", [
    (dict(ways=13, shots=1, queries=1), ["13-way", "only 12 classes"]),
    (dict(ways=5, shots=3, queries=3), ["need 6 examples per class", "12 of 12 classes have fewer", "at most 5"]),
    (dict(ways=0, shots=1, queries=1), ["ways must be a whole number >= 1"]),
    (dict(ways=5, shots=-1, queries=1), ["shots must be a whole number >= 1"]),
    (dict(ways=1, shots=1, queries=1), ["at least 2"]),
])
def test_impossible_requests_name_the_numbers(tiny_dataset, kw, words):
    with pytest.raises(EpisodeError) as e:
        EpisodeSampler(tiny_dataset, **kw)
    for w in words:
        assert w in str(e.value)


def test_taskbatch_rejects_inconsistent_shapes():
    x, y = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="tasks"):
        TaskBatch(x, y, torch.zeros(3, 3, 4), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="disagree"):
        TaskBatch(x, y[:, :2], x, y)
