"""Datasets: built-in ones, user files, deterministic splits and calibration subsets.

Importing this package touches no optional dependency; mlxtend, scikit-learn, mnist1d,
Pillow and datasets are imported only when a loader needs them.
"""

from slimkit.data.assemble import build_bundle
from slimkit.data.builtin import BUILTIN
from slimkit.data.bundle import DataBundle
from slimkit.data.load import accepted_forms, load_data
from slimkit.data.split import (
    allocate,
    batches,
    calibration_indices,
    calibration_subset,
    split,
)
from slimkit.data.validate import (
    check_inputs,
    check_label_range,
    check_labels,
    check_pair,
    check_same_features,
    data_warnings,
    infer_num_classes,
)

__all__ = [
    "BUILTIN",
    "DataBundle",
    "accepted_forms",
    "allocate",
    "batches",
    "build_bundle",
    "calibration_indices",
    "calibration_subset",
    "check_inputs",
    "check_label_range",
    "check_labels",
    "check_pair",
    "check_same_features",
    "data_warnings",
    "infer_num_classes",
    "load_data",
    "split",
]
