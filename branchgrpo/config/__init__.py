"""Configuration, in one place: flag fields (fields.py), the sections every run has (sections.py), the official
flags kept for compatibility (official.py) and the assembled run config with its parser (train.py). Algorithm units
own their sections (branchgrpo.algorithms); backbone specs say which model flags apply (branchgrpo.models)."""

from branchgrpo.core.flags import flag, parse_int_list, require  # noqa: F401
from branchgrpo.config.train import (  # noqa: F401
    TrainConfig,
    algorithm_from_flags,
    changed_flags,
    check_resume_config,
    config_from_flags,
    flag_catalogue,
    parse_flags,
    parse_train_config,
)
