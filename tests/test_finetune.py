"""The one fine-tuning module: seeded (dropout included), cached by key, and resumable after an interruption."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hyperinf.app import finetune
from hyperinf.app.finetune import Schedule, load_trainable, train_or_load
from hyperinf.errors import ConfigurationError, EmptyDataError, ResumedWarning

FEATURES = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
EXAMPLES = [(str(i), i % 2) for i in range(20)]  # the text is the row of FEATURES
SCHEDULE = Schedule(epochs=3, lr=1e-2, batch_size=4, seed=0)  # 5 batches an epoch, 15 steps


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))


def collate(batch):
    return FEATURES[[int(text) for text, _ in batch]], torch.tensor([label for _, label in batch])


def loss_fn(m, batch):
    return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")


def weights(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def test_same_settings_give_the_same_weights_and_the_second_call_loads_them(tmp_path):
    first, second = model(), model()
    trained = train_or_load(first, loss_fn, EXAMPLES, collate, SCHEDULE, tmp_path / "a.safetensors", progress=False)
    train_or_load(second, loss_fn, EXAMPLES, collate, SCHEDULE, tmp_path / "b.safetensors", progress=False)
    assert not trained["cached"] and all(torch.equal(p, q) for p, q in zip(weights(first), weights(second)))
    third = model()
    loaded = train_or_load(third, loss_fn, EXAMPLES, collate, SCHEDULE, tmp_path / "a.safetensors", progress=False)
    assert loaded["cached"] and all(torch.equal(p, q) for p, q in zip(weights(first), weights(third)))


@pytest.mark.parametrize("stop_at", [2, 9, 14])  # before the first checkpoint, mid-epoch 2, in the last epoch
def test_an_interrupted_training_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, stop_at):
    monkeypatch.setattr(finetune, "CHECKPOINT_STEPS", 3)
    whole = model()
    train_or_load(whole, loss_fn, EXAMPLES, collate, SCHEDULE, tmp_path / "whole.safetensors", progress=False)
    calls = []

    def interrupted_loss(m, batch):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return loss_fn(m, batch)

    path = tmp_path / "cut.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_or_load(model(), interrupted_loss, EXAMPLES, collate, SCHEDULE, path, progress=False)
    partial = tmp_path / "cut.partial.pt"
    assert partial.exists() == (stop_at > 3) and not path.exists()
    resumed = model()
    done = (stop_at - 1) // 3 * 3  # steps covered by the last checkpoint
    if done:
        with pytest.warns(ResumedWarning, match=f"after epoch {done // 5 + 1}, batch {done % 5}"):
            train_or_load(resumed, loss_fn, EXAMPLES, collate, SCHEDULE, path, progress=False)
    else:
        train_or_load(resumed, loss_fn, EXAMPLES, collate, SCHEDULE, path, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(weights(whole), weights(resumed)))
    assert path.exists() and not partial.exists()


def test_empty_data_and_mismatched_weights_are_named(tmp_path):
    with pytest.raises(EmptyDataError, match="training set is empty"):
        train_or_load(model(), loss_fn, [], collate, SCHEDULE, tmp_path / "x.safetensors", progress=False)
    with pytest.raises(ConfigurationError, match="does not match the model's trainable parameters"):
        load_trainable(model(), {"0.weight": torch.zeros(8, 4)})
