"""Clinical data the model is compared with: the arms of the reviewed RT+ICI trials.

``load_trials()`` reads and validates ``configs/trials/*.yaml`` and returns a :class:`TrialSet` with
tidy pandas views (``arms_table()``, ``endpoints_table()``) and look-ups (``get_arm``, ``get_trial``).
"""

from qspjax.data.trials import (
    NOT_REACHED,
    Arm,
    Landmark,
    Trial,
    TrialSet,
    count_from_pct,
    default_trials_directory,
    load_trial_file,
    load_trials,
)

__all__ = [
    "NOT_REACHED",
    "Arm",
    "Landmark",
    "Trial",
    "TrialSet",
    "count_from_pct",
    "default_trials_directory",
    "load_trial_file",
    "load_trials",
]
