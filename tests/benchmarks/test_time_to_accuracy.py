from __future__ import annotations

import pytest

from benchmarks.time_to_accuracy import time_to_accuracy


def test_first_epoch_reaching_each_target_with_elapsed_seconds():
    reached = time_to_accuracy([0.5, 0.72, 0.69, 0.81], [10.0, 12.0, 11.0, 9.0], [0.7, 0.8, 0.9])
    assert reached[0.7] == (2, 22.0)  # the dip at epoch 3 does not move it
    assert reached[0.8] == (4, pytest.approx(42.0))
    assert reached[0.9] is None


def test_a_target_met_exactly_counts():
    assert time_to_accuracy([0.86], [5.0], [0.86]) == {0.86: (1, 5.0)}
