"""The columns of a ratings sheet (the CS787 CSV and medrl's additions) and their values.

Shared by the ratings store (:mod:`rewards.ratings`), which validates and stores sheets,
and the rating rounds (:mod:`rewards.rounds`), which write them.
"""

from __future__ import annotations

#: The CS787 ratings CSV columns, in order.
CS787_COLUMNS: tuple[str, ...] = (
    "image_path",
    "rating",
    "modality",
    "expert_level",
    "prompt",
    "rater_id",
    "timestamp",
    "generator_ckpt",
    "seed",
)
#: Optional 0-10 scores of the six-aspect expert protocol (Prompt-to-Polyp, MSDM).
ASPECTS: tuple[str, ...] = (
    "clinical_realism",
    "prompt_faithfulness",
    "abnormality_detectability",
    "colour_contrast",
    "intra_set_diversity",
    "confidence_of_use",
)
#: The rating round (``medrl ratings export-round``) a rating belongs to; "" for ratings
#: that came in outside a round (and for every rating stored before rounds existed).
ROUND_COLUMN = "round"
COLUMNS: tuple[str, ...] = CS787_COLUMNS + (ROUND_COLUMN,) + ASPECTS
REQUIRED_COLUMNS: tuple[str, ...] = ("image_path", "rating", "rater_id", "timestamp")
#: Columns written by :func:`export_ratings`: ours plus the normalised rating.
EXPORT_COLUMNS: tuple[str, ...] = COLUMNS + ("rating_norm",)

#: Other header names accepted; matched after lower-casing and turning every run of
#: characters other than letters and digits into one underscore ("Color and Contrast"
#: -> "color_and_contrast").
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "image_path": ("path", "image", "filepath", "file", "image_file"),
    "rating": ("score", "expert_rating", "quality_rating"),
    "modality": ("modal",),
    "expert_level": ("expertise", "level", "rater_level", "expert_type"),
    "prompt": ("text", "caption"),
    "rater_id": ("rater", "expert_id", "expert", "annotator", "annotator_id", "user_id"),
    "timestamp": ("time", "rated_at", "datetime", "date"),
    "generator_ckpt": ("checkpoint", "ckpt", "generator", "model", "generator_checkpoint"),
    "seed": ("sample_seed",),
    "round": ("rating_round",),
    "clinical_realism": ("realism",),
    "prompt_faithfulness": ("faithfulness", "prompt_adherence", "prompt_alignment"),
    "abnormality_detectability": (
        "detectability",
        "detectability_of_abnormality",
        "abnormality_detection",
    ),
    "colour_contrast": (
        "color_contrast",
        "colour_and_contrast",
        "color_and_contrast",
        "contrast",
    ),
    "intra_set_diversity": ("diversity", "intraset_diversity"),
    "confidence_of_use": (
        "confidence",
        "confidence_of_use_clinical",
        "clinical_confidence",
        "confidence_of_clinical_use",
    ),
}

#: Ratings are 1 (poor), 2 (fair), 3 (good); aspects 0..10.
RATING_VALUES: tuple[int, ...] = (1, 2, 3)
ASPECT_MAX = 10.0
