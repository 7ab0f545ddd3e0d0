import types

import optuna
import pytest

from stages.common.callbacks import ReportToTrial
from stages.common.trial import PRUNED_AT


@pytest.mark.parametrize("epochs, pruned_after", [(3, 1), (1, None)])
def test_a_trial_is_pruned_before_its_last_epoch_never_after_it(epochs, pruned_after):
    """A pruner that prunes everything stops a 3-epoch run after its first epoch; a run whose
    first epoch is its last trains to the end and is not marked pruned (Optuna's successive
    halving decides at the last epoch too when it is a rung)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()
    report = ReportToTrial(trial, "val_accuracy")
    report.set_model(types.SimpleNamespace(stop_training=False))
    report.set_params({"epochs": epochs, "steps": 4, "verbose": 0})
    report.on_epoch_end(0, {"val_accuracy": 0.5})
    assert report.pruned_after == pruned_after and report.model.stop_training is (pruned_after is not None)
    assert trial.user_attrs.get(PRUNED_AT) == pruned_after and trial.storage.get_trial(trial._trial_id).intermediate_values == {1: 0.5}
