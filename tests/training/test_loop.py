"""The epoch loop: a due ``Stop`` ends the epoch right after an optimiser step, and ``progress``
says where the epoch resumes."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from torch.nn import functional

from fineserve.training.data import Examples
from fineserve.training.distributed import Dist
from fineserve.training.loop import Progress, Step, Stop, epoch_batches, predict, train_one_epoch

EXAMPLES, BATCH = 8, 2  # 4 batches per epoch


def _features(batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
    return batch


def _loss(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    return functional.cross_entropy(logits, batch["labels"])


class Epoch:
    """A linear head on fixed features, trained with SGD one epoch at a time."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(4, 2)
        self.data = Examples({"features": torch.randn(EXAMPLES, 4)}, torch.randint(0, 2, (EXAMPLES,)))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.progress = Progress()
        self.losses: list[float] = []

    def run(self, stop: Stop, *, grad_accum: int = 1, on_step: Callable[[], None] | None = None) -> None:
        def after_step(loss: float) -> None:
            self.losses.append(loss)
            if on_step is not None:
                on_step()

        train_one_epoch(
            module=self.model,
            data=self.data,
            step=Step(_features, _loss, torch.device("cpu")),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            progress=self.progress,
            batches=list(torch.arange(EXAMPLES).split(BATCH)),
            grad_accum=grad_accum,
            grad_clip=None,
            set_train_mode=self.model.train,
            on_step=after_step,
            stop=stop,
            show=False,
            desc="test",
        )


def test_without_a_stop_the_epoch_runs_every_batch() -> None:
    epoch, stop = Epoch(), Stop()
    epoch.run(stop)
    assert (epoch.progress.step, epoch.progress.batch, len(epoch.losses)) == (4, 4, 4)
    assert stop.reason is None


def test_stop_after_steps_ends_the_epoch_after_that_step() -> None:
    epoch, stop = Epoch(), Stop(after_steps=2)
    epoch.run(stop)
    assert stop.reason == "stop_after_steps=2 reached"
    assert (epoch.progress.step, epoch.progress.batch, len(epoch.losses)) == (2, 2, 2)


def test_a_stop_requested_during_a_step_ends_the_epoch_there() -> None:
    epoch, stop = Epoch(), Stop()

    def request_at_step_3() -> None:
        if epoch.progress.step == 3:
            stop.reason = "requested"

    epoch.run(stop, on_step=request_at_step_3)
    assert stop.reason == "requested" and (epoch.progress.step, epoch.progress.batch) == (3, 3)


def test_a_stop_waits_for_the_optimiser_step_of_accumulated_batches() -> None:
    epoch, stop = Epoch(), Stop(after_steps=1)
    epoch.run(stop, grad_accum=2)  # two batches per optimiser step
    assert (epoch.progress.step, epoch.progress.batch) == (1, 2)


def test_a_stopped_epoch_resumes_at_the_next_batch_and_matches_an_unstopped_one() -> None:
    straight = Epoch()
    straight.run(Stop())
    stopped = Epoch()
    stopped.run(Stop(after_steps=1))
    stopped.run(Stop())  # the same progress: batches 1..3
    assert (stopped.progress.step, stopped.progress.batch) == (4, 4)
    assert stopped.losses == straight.losses
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, stopped.model.state_dict()[name]), name


def test_batches_grouped_by_length_cover_the_epoch_once_and_pad_less() -> None:
    lengths = torch.randint(3, 60, (1000,), generator=torch.Generator().manual_seed(1))
    ctx = Dist()
    grouped = epoch_batches(1000, 16, seed=0, epoch=2, ctx=ctx, max_batches=None, lengths=lengths)
    plain = epoch_batches(1000, 16, seed=0, epoch=2, ctx=ctx, max_batches=None)
    assert sorted(torch.cat(grouped).tolist()) == list(range(1000))
    # what padding to each batch's longest text costs, grouped against a random mix
    padded = {name: sum(len(b) * int(lengths[b].max()) for b in batches) for name, batches in
              (("grouped", grouped), ("plain", plain))}  # fmt: skip
    assert padded["grouped"] < 0.75 * padded["plain"], padded
    again = epoch_batches(1000, 16, seed=0, epoch=2, ctx=ctx, max_batches=None, lengths=lengths)
    assert all(torch.equal(a, b) for a, b in zip(grouped, again, strict=True))  # resumable
    other = epoch_batches(1000, 16, seed=0, epoch=3, ctx=ctx, max_batches=None, lengths=lengths)
    assert not all(torch.equal(a, b) for a, b in zip(grouped, other, strict=False))


class TokenCounter(nn.Module):
    """A text "model" whose logits see only the unpadded tokens (their sum and count), and that
    records how wide each batch it was given is."""

    def __init__(self) -> None:
        super().__init__()
        self.widths: list[int] = []

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> SimpleNamespace:
        self.widths.append(input_ids.shape[1])
        kept = (input_ids * attention_mask).sum(dim=1)
        return SimpleNamespace(logits=torch.stack([kept, attention_mask.sum(dim=1)], dim=1).float())


def test_predict_batches_texts_longest_first_and_returns_them_in_the_datas_order() -> None:
    lengths = [1, 8, 2, 7, 3, 6, 4, 5]
    ids = torch.zeros(len(lengths), 8, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = i + 1, 1
    data = Examples({"input_ids": ids, "attention_mask": mask}, torch.arange(len(lengths)) % 2)
    model = TokenCounter()
    logits, labels = predict(
        model, data, Step(_features, _loss, torch.device("cpu")), batch_size=2, show=False, desc="test"
    )
    assert logits[:, 1].tolist() == lengths  # each row is its own example's
    assert logits[:, 0].tolist() == [(i + 1) * n for i, n in enumerate(lengths)]
    assert labels.tolist() == data.labels.tolist()
    # in data order the batches would be 8, 7, 6 and 5 tokens wide: 26 columns, not 20
    assert model.widths == [8, 6, 4, 2]
