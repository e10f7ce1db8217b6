"""The memory-augmented learner (``mann``): its memory's reads and writes on their own, the state it keeps
across padded points, and a tiny model that learns to recall labels in a few hundred steps."""

from __future__ import annotations

import pytest
import torch

import metalens
from metalens.episode import Episode, TaskSpec
from metalens.learners.memory import MANN, cosine_read, least_used, lru_write, update_usage

torch.set_num_threads(1)

SEED = 0


def test_the_memory_stores_and_retrieves():
    """Write three keys to fresh slots one after the other, then read each back by its (noisy) content."""
    g = torch.Generator().manual_seed(SEED)
    N, W = 6, 8
    memory = torch.full((1, N, W), 1e-6)
    usage = torch.zeros(1, N)
    read = torch.zeros(1, 1, N)
    stored = torch.randn(3, W, generator=g)
    never = torch.full((1, 1), -50.0)  # sigmoid(gate) ~ 0: write to the least-used slot
    slots = []
    for k in stored:
        lu = least_used(usage, 1)
        slots.append(int(lu.argmax()))
        memory, write = lru_write(memory, k.view(1, 1, W), never, read, lu)
        read, _ = cosine_read(memory, k.view(1, 1, W), 20.0)
        usage = update_usage(usage, read, write, 0.95)
    assert len(set(slots)) == 3, f"seed {SEED}: keys were written over each other ({slots})"
    for i, k in enumerate(stored):
        _, r = cosine_read(memory, (k + 0.1 * torch.randn(W, generator=g)).view(1, 1, W), 50.0)
        torch.testing.assert_close(r[0, 0], k, atol=1e-3, rtol=1e-3, msg=f"seed {SEED}: key {i} not retrieved")


def test_lru_writes_go_to_the_least_used_slot():
    g = torch.Generator().manual_seed(SEED)
    B, N, W, R = 2, 5, 3, 1
    memory = torch.randn(B, N, W, generator=g)
    usage = torch.tensor([[0.9, 0.2, 0.05, 0.7, 0.3], [0.1, 0.1, 0.4, 0.0, 0.8]])
    read = torch.softmax(torch.randn(B, R, N, generator=g), -1)
    key = torch.randn(B, R, W, generator=g)
    lu = least_used(usage, R)
    assert lu.argmax(-1).tolist() == [[2], [3]]
    new, write = lru_write(memory, key, torch.full((B, R), -60.0), read, lu)  # all to the least-used slot
    for b, slot in enumerate((2, 3)):
        torch.testing.assert_close(write[b, 0], torch.nn.functional.one_hot(torch.tensor(slot), N).float())
        torch.testing.assert_close(new[b, slot], key[b, 0])  # erased, then written: the key itself
        others = [i for i in range(N) if i != slot]
        torch.testing.assert_close(new[b, others], memory[b, others], atol=1e-12, rtol=0)  # untouched
    # the other extreme: all of the write goes where the last read went (the least-used slot is still erased)
    new, write = lru_write(memory, key, torch.full((B, R), 60.0), read, lu)
    torch.testing.assert_close(write, read)
    expected = memory * (1 - lu.amax(1))[..., None] + read.transpose(1, 2) @ key
    torch.testing.assert_close(new, expected)
    # ties in usage go to the lowest index; each head gets its own slot, least used first
    assert least_used(torch.zeros(1, 4), 2).argmax(-1).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="n must be in"):
        least_used(torch.zeros(1, 4), 5)


def test_usage_decays_and_adds_reads_and_writes():
    usage = torch.tensor([[1.0, 0.5]])
    read = torch.tensor([[[0.25, 0.75]]])
    write = torch.tensor([[[1.0, 0.0]]])
    torch.testing.assert_close(update_usage(usage, read, write, 0.5), torch.tensor([[1.75, 1.0]]))


def test_a_step_keeps_the_state_where_not_live_and_a_prediction_ignores_padded_points():
    spec = TaskSpec(kind="classification", x_shape=(4,), num_classes=3)
    mann = MANN(spec, MANN.Config(hidden=8, slots=6, width=4, heads=2))
    state = mann.initial_state(2, dtype=torch.float32, device=torch.device("cpu"))
    new, _ = mann.step(state, torch.randn(2, 4 + 3 + 1), live=torch.tensor([True, False]))
    for a, b in zip(new, state):
        assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])


def _recall_episode(n: int, ways: int, dim: int, queries: int, g: torch.Generator) -> Episode:
    """Copy / recall: ``ways`` random vectors with a random labelling, then ``queries`` of them again, drawn with
    replacement (so that a query's label cannot be guessed by elimination from the labels seen before it)."""
    x = torch.randn(n, ways, dim, generator=g)
    y = torch.argsort(torch.rand(n, ways, generator=g), 1)
    pick = torch.randint(ways, (n, queries), generator=g)
    return Episode(x, y, x.gather(1, pick[..., None].expand(n, queries, dim)), y.gather(1, pick), num_classes=ways)


def test_a_tiny_mann_learns_to_recall_labels():
    """3 random vectors with random labels, then 8 of them again: recalling a query's label needs what the
    task's support set stored (chance 1/3). Measured: 76% query accuracy after 500 steps."""
    seed, ways, dim = 1, 3, 8
    spec = TaskSpec(kind="classification", x_shape=(dim,), num_classes=ways)
    mann = metalens.make_learner("mann", spec, seed=seed, hidden=32, slots=8, width=16, heads=1)
    opt = torch.optim.Adam(mann.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(500):
        loss, _ = mann.meta_loss(_recall_episode(32, ways, dim, 8, g))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mann.parameters(), 1.0)
        opt.step()
    test = _recall_episode(200, ways, dim, 8, torch.Generator().manual_seed(seed + 1000))
    with torch.no_grad():
        acc = float((mann.predict(test.support_x, test.support_y, test.query_x).probs.argmax(-1) == test.query_y)
                    .float().mean())
    assert acc > 0.6, f"seed {seed}: recall accuracy {acc:.3f} after 500 steps (chance 1/3)"
