"""Selection from scores: exactly the k most negative, ties by row, class shares under balance."""

import pytest
import torch

from hyperinf.app.select import skewed_labels
from hyperinf.errors import DataError
from hyperinf.selection import cosine_scores, ranks, select_top, selection_size


def test_select_top_keeps_exactly_the_k_most_negative_scores():
    scores = torch.randn(200, generator=torch.Generator().manual_seed(0))
    for fraction in (0.05, 0.2, 0.4, 1.0):
        picked = select_top(scores, fraction)
        k = round(fraction * 200)
        assert picked.numel() == k
        threshold = sorted(scores.tolist())[k - 1]
        assert set(picked.tolist()) == {i for i, s in enumerate(scores.tolist()) if s <= threshold}
        assert torch.all(scores[picked][:-1] <= scores[picked][1:])  # most helpful first


def test_ties_are_broken_by_row_index():
    scores = torch.tensor([0.0, -1.0, 0.0, -1.0, 0.0])
    assert select_top(scores, 0.6).tolist() == [1, 3, 0]
    assert ranks(scores).tolist() == [2, 0, 3, 1, 4]


def test_balance_keeps_every_class_share_and_the_plain_selection_does_not():
    labels = torch.tensor([0] * 80 + [1] * 20)
    scores = torch.cat([torch.linspace(-2, -1, 80), torch.linspace(0, 1, 20)])  # class 0 all more helpful
    assert (labels[select_top(scores, 0.2)] == 0).all()
    picked = select_top(scores, 0.2, labels, balance=True)
    assert int((labels[picked] == 0).sum()) == 16 and int((labels[picked] == 1).sum()) == 4
    assert set(picked[labels[picked] == 1].tolist()) == set(range(80, 84))  # class 1's four most helpful
    assert torch.all(scores[picked][:-1] <= scores[picked][1:])


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_a_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(DataError, match="must be in \\(0, 1\\]"):
        select_top(torch.zeros(10), fraction)


def test_a_selection_smaller_than_one_example_is_refused():
    with pytest.raises(DataError, match="< 1 example"):
        selection_size(0.05, 9)
    with pytest.raises(DataError, match="label 1"):
        select_top(torch.zeros(30), 0.1, torch.tensor([0] * 28 + [1] * 2), balance=True)


def test_bad_scores_and_labels_are_refused():
    with pytest.raises(DataError, match="NaN"):
        select_top(torch.tensor([0.0, float("nan")]), 0.5)
    with pytest.raises(DataError, match="non-empty"):
        select_top(torch.zeros(0), 0.5)
    with pytest.raises(DataError, match="needs the pool's labels"):
        select_top(torch.zeros(4), 0.5, balance=True)
    with pytest.raises(DataError, match="differ in shape"):
        select_top(torch.zeros(4), 0.5, torch.zeros(3), balance=True)


def test_cosine_scores_refuse_zero_norms():
    with pytest.raises(DataError, match="zero gradient"):
        cosine_scores(torch.ones(2), 1.0, torch.tensor([1.0, 0.0]))
    with pytest.raises(DataError, match="no direction"):
        cosine_scores(torch.ones(2), 0.0, torch.ones(2))


def test_a_selection_that_under_represents_a_label_is_named():
    labels = torch.tensor([0] * 50 + [1] * 50)
    assert skewed_labels(labels, torch.arange(40, 60), ["neg", "pos"]) == []  # 50 / 50
    assert (
        skewed_labels(labels, torch.cat([torch.arange(5), torch.arange(50, 65)]), ["neg", "pos"]) == []
    )  # 25%: half its share
    assert skewed_labels(labels, torch.cat([torch.arange(4), torch.arange(50, 66)]), ["neg", "pos"]) == ["neg"]  # 20%


def test_round_robin_gives_each_target_its_turn_against_a_brute_force_reference():
    from hyperinf.selection import round_robin

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 5, generator=generator)  # pool x targets
    scores[:, 0] -= 10 * torch.arange(40.0).flip(0) / 40  # target 0 dominates the mean
    rankings = torch.argsort(scores, dim=0).T  # each target's rows, most helpful (most negative) first
    for size in (1, 7, 20, 40):
        taken: list[int] = []
        turn = 0
        while len(taken) < size:  # the reference: each target in turn takes its best remaining row
            taken.append(next(r for r in rankings[turn].tolist() if r not in taken))
            turn = (turn + 1) % 5
        assert round_robin(rankings[:, :size], size).tolist() == taken
    mean_choice = set(torch.argsort(scores.mean(1))[:10].tolist())
    assert set(round_robin(rankings, 10).tolist()) != mean_choice  # not the mean's selection
    with pytest.raises(DataError, match="fewer than the 9 to select"):
        round_robin(rankings[:1, :3], 9)
