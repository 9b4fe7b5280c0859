"""Detection rate and ROC-AUC on cases small enough to count by hand."""

import pytest
import torch

from hyperinf.metrics import detection_curve, detection_rate, detection_summary, roc_auc

SCORES = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4, 0.5, 0.0])
BAD = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
# Inspection order by score: idx 0 (bad), 2, 4 (bad), 6, 8, 7, 3 (bad), 5, 1, 9 (bad).


def test_detection_curve_counts_bad_examples_in_inspection_order():
    expected = torch.tensor([1, 1, 2, 2, 2, 2, 3, 3, 3, 4], dtype=torch.float64) / 4
    torch.testing.assert_close(detection_curve(SCORES, BAD), expected)


def test_detection_rate_at_fractions():
    assert detection_rate(SCORES, BAD, 0.1) == 0.25
    assert detection_rate(SCORES, BAD, 0.3) == 0.5
    assert detection_rate(SCORES, BAD, 0.7) == 0.75
    assert detection_rate(SCORES, BAD, 1.0) == 1.0
    assert detection_rate(SCORES, BAD, 0.0) == 0.0


def test_roc_auc_counts_ordered_pairs_with_ties_as_half():
    # Bad scores 0.9, 0.7, 0.3, 0.0 against 6 good: above 6, 5, 2, 0 good ones -> 13 of 24 pairs.
    assert roc_auc(SCORES, BAD) == pytest.approx(13 / 24)
    tied = torch.tensor([1.0, 1.0, 0.0])
    assert roc_auc(tied, torch.tensor([True, False, False])) == pytest.approx(0.75)


def test_metrics_reject_degenerate_labels():
    with pytest.raises(ValueError, match="at least one bad"):
        detection_curve(SCORES, torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="both bad and good"):
        roc_auc(SCORES, torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="fraction"):
        detection_rate(SCORES, BAD, 10)


def test_detection_summary_has_the_table_columns():
    summary = detection_summary(SCORES, BAD, inspected=(0.1, 0.3))
    assert summary == {"detected@10%": 0.25, "detected@30%": 0.5, "roc_auc": pytest.approx(13 / 24)}
