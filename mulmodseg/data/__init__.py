"""Data layer: NIfTI files on disk -> checked case lists -> training-space volumes (cached) -> crops,
and back from the training space to the original scan with `restore`.

Of the rest of mulmodseg it imports only ``errors`` (``DataError`` is a ``UserError``) and ``files``'
``atomic_write`` (the cache's files).
"""
from .cache import VolumeCache, file_sha256, load_training_volumes
from .cases import (
                    Case,
                    DataError,
                    amos_modality,
                    class_key,
                    discover_amos,
                    discover_cases,
                    discover_modalities,
                    has_validation_list,
                    is_extra_channel,
                    labelled_classes,
                    labels_file,
                    nifti_stem,
                    not_nifti_hint,
                    validation_cases,
)
from .checks import check_cases
from .labels import apply_label_map, parse_label_map
from .preprocess import (
    default_settings,
    load_volume,
    preprocess,
    read_label,
    resolve_settings,
    restore,
    restore_argmax,
    restore_probabilities,
)
from .sampling import POSITIVE_CENTRES, CropDataset, collate_crops, labelled_mask
from .splits import Splits, fold_problems, kfold_split, make_folds, split_cases, subsample

__all__ = [
    "POSITIVE_CENTRES", "Case", "class_key", "labelled_classes", "labels_file", "CropDataset", "DataError",
    "VolumeCache", "amos_modality", "apply_label_map", "check_cases",
    "collate_crops", "default_settings", "discover_amos", "discover_cases", "discover_modalities",
    "file_sha256", "fold_problems", "has_validation_list", "is_extra_channel", "kfold_split", "make_folds",
    "labelled_mask", "load_training_volumes", "load_volume", "nifti_stem", "not_nifti_hint", "parse_label_map",
    "preprocess", "read_label", "resolve_settings", "restore", "restore_argmax", "restore_probabilities", "Splits",
    "split_cases", "subsample", "validation_cases",
]
