"""Evaluation from cached encodings: the same predictions as encoding every episode's examples."""
import pytest
import torch

from metamap.algorithms.base import EncodingLearner
from metamap.data.dataset import ClassDataset
from metamap.data.images import ImageSpec
from metamap.tasks.batch import TaskBatch
from metamap.tasks.sampler import EpisodeSampler
from metamap.train.evaluate import blocks_within, cached_episodes, can_cache, episode_inputs, evaluate
from tests.learner_helpers import learner as build

LEARNERS = [("protonet",), ("matching", "learner.scale=10"), ("matching", "learner.fce=true"),
            ("siamese",), ("siamese", 'learner.loss="bce"'), ("relation",), ("finetune", "learner.steps=5"),
            ("finetune", 'learner.head="cosine"', "learner.steps=5")]


@pytest.fixture(scope="module")
def dataset():
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (72, 1, 16, 16), generator=g, dtype=torch.uint8)
    return ClassDataset(data, torch.arange(12).repeat_interleave(6), [f"c{i}" for i in range(12)],
                        ImageSpec(size=16), "synthetic")


def trained_statistics(learner):
    """Non-trivial batch-norm running statistics, so that evaluation mode matters."""
    g = torch.Generator().manual_seed(2)
    for m in learner.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return learner.eval()


@pytest.mark.parametrize("spec", LEARNERS, ids=lambda s: "-".join(s))
def test_cached_codes_give_the_same_outputs(dataset, spec):
    learner = trained_statistics(build(*spec))
    sampler = EpisodeSampler(dataset, 4, 2, 3, seed=5)
    assert isinstance(learner, EncodingLearner) and can_cache(learner, sampler)
    ids = list(range(7))
    with torch.no_grad():
        plain = [learner.adapt_tasks(t.support_x, t.support_y, t.ways)(t.query_x)
                 for t in episode_inputs(sampler, ids, 3, "cpu", None)]
        cached = [learner.adapt_encoded(t.support_x, t.support_y, t.ways)(t.query_x)
                  for t in cached_episodes(learner, sampler, ids, 3, "cpu", None, 1024)]
    assert len(plain) == len(cached) == 3
    for a, b in zip(plain, cached):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("cache_mb", [1024, 0.004, 1e-7])      # whole split, blocks, per episode
def test_evaluate_scores_do_not_depend_on_the_cache(dataset, cache_mb):
    learner = trained_statistics(build("protonet"))
    sampler = EpisodeSampler(dataset, 5, 1, 3, seed=3)
    reference = evaluate(learner, sampler, 40, progress=False, cache_mb=0)
    result = evaluate(learner, sampler, 40, progress=False, cache_mb=cache_mb)
    assert result.scores == reference.scores and result.mean == reference.mean


def test_each_distinct_example_is_encoded_once(dataset):
    learner = trained_statistics(build("protonet"))
    sampler = EpisodeSampler(dataset, 5, 1, 3, seed=3)
    seen = []
    learner.encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    evaluate(learner, sampler, 30, progress=False)
    positions = sampler.episode_positions(range(30))
    distinct = torch.unique(torch.cat([positions.support_x.flatten(), positions.query_x.flatten()]))
    assert sum(seen) == len(distinct) + 1          # plus one example probed for the code size
    seen.clear()
    evaluate(learner, sampler, 30, progress=False, cache_mb=0)
    assert sum(seen) == 30 * 5 * (1 + 3)


def test_blocks_hold_at_most_capacity_distinct_examples():
    x = torch.tensor([[0, 1], [1, 2], [3, 4], [4, 5], [6, 7]])
    positions = TaskBatch(x[:, :1], torch.zeros(5, 1, dtype=torch.long), x[:, 1:], torch.zeros(5, 1, dtype=torch.long))
    assert list(blocks_within(positions, 8)) == [(0, 5)]
    assert list(blocks_within(positions, 3)) == [(0, 2), (2, 4), (4, 5)]
    assert list(blocks_within(positions, 1)) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_batch_dependent_encoders_are_not_cached(dataset):
    learner = trained_statistics(build("protonet"))
    sampler = EpisodeSampler(dataset, 5, 1, 3, seed=3)
    assert can_cache(learner, sampler)
    assert not can_cache(learner.train(), sampler)            # batch statistics in training mode
    learner.eval()
    bn = next(m for m in learner.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean = bn.running_var = None                    # batch statistics at evaluation too
    assert not learner.encodes_per_example()
    tuned = build("finetune", "learner.finetune_backbone=true").eval()
    assert not tuned.encodes_per_example()
