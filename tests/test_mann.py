"""MANN: memory read/write weights (with and without key strength), add vectors and the LRU usage
update by hand, sequences, determinism, CLI."""
import math

import pytest
import torch
from torch import nn

from metamap.algorithms.mann import (
    MemoryAugmentedNetwork,
    least_used,
    least_used_shared,
    presentation_accuracy,
    presentation_numbers,
    read_weights,
    updated_usage,
    write_weights,
)
from metamap.errors import ConfigError
from tests.learner_helpers import cli_train_eval, episode, learner


def test_read_weights_are_a_softmax_of_cosine_similarities():
    keys = torch.tensor([[[1.0, 0.0]]])
    memory = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    cos = torch.tensor([1.0, 0.0, 1 / math.sqrt(2)])
    assert torch.allclose(read_weights(keys, memory), (cos.exp() / cos.exp().sum()).view(1, 1, 3))


def test_key_strength_scales_the_cosines_before_the_softmax():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    memory = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    beta = torch.tensor([[[3.0], [0.5]]])
    cos = torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)], [0.0, 1.0, 1 / math.sqrt(2)]])
    expected = (beta[0] * cos).exp() / (beta[0] * cos).exp().sum(-1, keepdim=True)
    assert torch.allclose(read_weights(keys, memory, beta), expected.unsqueeze(0))


def test_least_used_gives_each_head_its_own_slot_ties_to_the_lower_index():
    usage = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    assert least_used(usage, 1).tolist() == [[[0, 1, 0, 0]]]
    assert least_used(usage, 2).tolist() == [[[0, 1, 0, 0], [0, 0, 0, 1]]]


def test_write_weights_mix_last_read_and_least_used():
    gate = torch.tensor([[[0.25]]])
    previous_read = torch.tensor([[[0.7, 0.2, 0.1, 0.0]]])
    lu = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]])
    expected = [0.25 * 0.7, 0.25 * 0.2, 0.25 * 0.1, 0.75]
    assert write_weights(gate, previous_read, lu).flatten().tolist() == pytest.approx(expected)


def test_usage_decays_and_adds_reads_and_writes_over_heads():
    usage = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    read = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]])
    write = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    expected = [0.95 * 0.5 + 0.5 + 1, 0.95 * 0.1 + 0.5, 0.95 * 0.3 + 0.5, 0.95 * 0.1 + 0.5 + 1]
    assert updated_usage(usage, read, write, 0.95).flatten().tolist() == pytest.approx(expected)


def controlled_mann(**deviations):
    """1 head, 4 slots of width 2; all weights zero, so h = 0, the key is tanh(key bias) and the gate 1/2.
    Without ``deviations`` it is the paper's model (no key strength, the key is what is written)."""
    net = MemoryAugmentedNetwork(nn.Identity(), 1, features=2, classes=2, hidden=3, slots=4, width=2,
                                 heads=1, gamma=0.5, **{"strength": 0, "add_vector": False, **deviations})
    for p in net.parameters():
        nn.init.zeros_(p)
    with torch.no_grad():
        net.key.bias.copy_(torch.atanh(torch.tensor([0.5, -0.5])))
    return net


def test_two_memory_steps_by_hand():
    net = controlled_mann()
    x, label = torch.zeros(1, 2), torch.zeros(1, 2)
    _, s1 = net.step(x, label, net.initial_state(1, x))
    # Step 1: no reads yet, so the head writes with weight 1/2 to the least used slot (0, a tie).
    assert torch.allclose(s1.memory[0, 0], torch.tensor([0.25, -0.25]))
    assert torch.allclose(s1.memory[0, 1:], torch.full((3, 2), 1e-6))
    # The key matches slot 0 (cosine 1) and is orthogonal to the others (cosine 0).
    read1 = torch.tensor([math.e, 1, 1, 1]) / (math.e + 3)
    assert torch.allclose(s1.read[0, 0], read1)
    assert torch.allclose(s1.usage[0], read1 + torch.tensor([0.5, 0, 0, 0]))
    assert torch.allclose(s1.reads[0], read1 @ s1.memory[0])
    # Step 2: slot 1 is now least used (ties go to the lower index); it is cleared, then written.
    _, s2 = net.step(x, label, s1)
    write2 = 0.5 * read1 + 0.5 * torch.tensor([0.0, 1, 0, 0])
    key = torch.tensor([0.5, -0.5])
    expected = s1.memory[0].clone()
    expected[1] = 0
    expected += write2.unsqueeze(1) * key
    assert torch.allclose(s2.memory[0], expected)
    assert torch.allclose(s2.usage[0], 0.5 * s1.usage[0] + s2.read[0, 0] + write2)


def test_add_vector_is_written_and_key_strength_sharpens_the_read():
    fresh = MemoryAugmentedNetwork(nn.Identity(), 1, features=2, classes=2, hidden=3, strength=5.0)
    assert fresh.strength.bias.tolist() == pytest.approx([math.log(math.expm1(4.0))] * 4)  # beta = 1 + softplus = 5
    net = controlled_mann(strength=5.0, add_vector=True)
    with torch.no_grad():
        net.strength.bias.fill_(math.log(math.expm1(2.0)))                        # beta = 3
        net.add.bias.copy_(torch.atanh(torch.tensor([0.0, 0.8])))
    x, label = torch.zeros(1, 2), torch.zeros(1, 2)
    _, s1 = net.step(x, label, net.initial_state(1, x))
    # The add vector (0, 0.8), not the key (0.5, -0.5), goes into the least used slot with weight 1/2.
    assert torch.allclose(s1.memory[0, 0], torch.tensor([0.0, 0.4]))
    # The key reads with beta = 3: cosine -1/sqrt(2) with slot 0, 0 with the empty slots (all ones / sqrt 2).
    logits = 3 * torch.tensor([-1 / math.sqrt(2), 0, 0, 0])
    assert torch.allclose(s1.read[0, 0], logits.softmax(0))


def test_paper_least_used_vector_is_shared_by_the_heads():
    usage = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    assert least_used_shared(usage, 1).tolist() == [[0, 1, 0, 0]]
    assert least_used_shared(usage, 2).tolist() == [[0, 1, 0, 1]]
    assert least_used_shared(usage, 3).tolist() == [[0, 1, 1, 1]]


def test_paper_write_with_two_heads_by_hand():
    """The paper's equations: both heads write to the 2 least used slots, only the least used is cleared."""
    net = MemoryAugmentedNetwork(nn.Identity(), 1, features=2, classes=2, hidden=3, slots=4, width=2,
                                 heads=2, gamma=0.5, strength=0, add_vector=False, least_used="shared")
    for p in net.parameters():
        nn.init.zeros_(p)
    with torch.no_grad():
        net.key.bias.copy_(torch.atanh(torch.tensor([0.5, -0.5, 0.2, 0.4])))
    x, label = torch.zeros(1, 2), torch.zeros(1, 2)
    state = net.initial_state(1, x)
    state.memory = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]])
    state.usage = torch.tensor([[0.9, 0.2, 0.8, 0.1]])
    state.read = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]])
    _, s1 = net.step(x, label, state)
    lu = torch.tensor([0.0, 1, 0, 1])                    # slots 3 and 1 are the 2 least used
    keys = torch.tensor([[0.5, -0.5], [0.2, 0.4]])
    write = 0.5 * state.read[0] + 0.5 * lu               # gate sigmoid(0) = 1/2, per head
    expected = state.memory[0].clone()
    expected[3] = 0                                      # only the least used slot is cleared
    expected += write.T @ keys
    assert torch.allclose(s1.memory[0], expected)
    read = torch.stack([read_weights(keys[h].view(1, 1, 2), s1.memory)[0, 0] for h in range(2)])
    assert torch.allclose(s1.read[0], read)
    assert torch.allclose(s1.usage[0], 0.5 * state.usage[0] + read.sum(0) + write.sum(0))
    with pytest.raises(ConfigError, match="least_used"):
        MemoryAugmentedNetwork(nn.Identity(), 1, features=2, classes=2, least_used="lru")


def test_strength_must_exceed_one_or_be_off():
    with pytest.raises(ConfigError, match="strength"):
        controlled_mann(strength=1.0)
    assert controlled_mann(strength=0).strength is None


def test_presentation_numbers_and_accuracy():
    labels = torch.tensor([[0, 1, 0, 0, 1]])
    assert presentation_numbers(labels, 2).tolist() == [[1, 1, 2, 3, 2]]
    logits = torch.tensor([[[1.0, 0], [1, 0], [1, 0], [0, 1], [0, 1]]])     # right, wrong, right, wrong, right
    acc = presentation_accuracy(logits, labels, presentation_numbers(labels, 2), which=(1, 2, 3, 5))
    assert acc == {1: 0.5, 2: 1.0, 3: 0.0}


def test_training_sequence_metrics_and_seeded_order():
    net = learner("mann", "learner.hidden=16", "learner.slots=8", "learner.width=4", "learner.heads=2",
                  shape=(1, 4, 4))
    tasks = episode(ways=3, shots=1, queries=3, shape=(1, 4, 4))
    state = torch.get_rng_state()
    loss, metrics = net.meta_loss(tasks)
    assert torch.equal(state, torch.get_rng_state())
    assert set(metrics) == {"accuracy", "acc@1", "acc@2"} and math.isfinite(loss.item())
    assert net.meta_loss(tasks)[0].item() == loss.item()
    loss.backward()
    assert net.controller.weight_ih.grad.abs().sum() > 0


def test_queries_are_answered_independently():
    net = learner("mann", "learner.hidden=16", "learner.slots=8", "learner.width=4", shape=(1, 4, 4)).eval()
    tasks = episode(tasks=1, ways=3, queries=2, shape=(1, 4, 4))
    predict = net.adapt(tasks.support_x[0], tasks.support_y[0], 3)
    both = predict(tasks.query_x[0])
    assert both.shape == (6, 3)
    assert torch.allclose(predict(tasks.query_x[0, 2:3]), both[2:3], atol=1e-6)


def test_deterministic_under_a_seed_and_too_many_ways_refused():
    a, b = (learner("mann", "learner.hidden=16", "learner.slots=8", "learner.width=4", shape=(1, 4, 4), seed=1)
            for _ in range(2))
    tasks = episode(ways=3, shape=(1, 4, 4))
    assert torch.equal(a.meta_loss(tasks)[0], b.meta_loss(tasks)[0])
    assert a.classes == 5        # the paper's 5-way setting is MANN's default
    assert a.strength is not None and a.add is not None
    paper = learner("mann", "learner.strength=0", "learner.add_vector=false", shape=(1, 4, 4))
    assert paper.strength is None and paper.add is None
    small = learner("mann", "learner.classes=2", shape=(1, 4, 4))
    with pytest.raises(ConfigError, match="3-way"):
        small.meta_loss(tasks)


def test_flatten_backbone_scales_the_pixels():
    x = torch.arange(8.0).view(2, 1, 2, 2)
    assert torch.equal(learner("mann", shape=(1, 2, 2)).encoder(x), 0.2 * x.flatten(1))
    assert torch.equal(learner("mann", "model.scale=1.0", shape=(1, 2, 2)).encoder(x), x.flatten(1))


@pytest.mark.integration
def test_cli_train_eval_and_checkpoint_round_trip(tmp_path):
    _, loaded = cli_train_eval(tmp_path, "mann", "learner.hidden=16", "learner.slots=8", "learner.width=4",
                               "learner.heads=2", "episode.tasks_per_batch=2")
    assert isinstance(loaded, MemoryAugmentedNetwork) and loaded.heads == 2
