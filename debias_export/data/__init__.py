"""Data sources: labelled image CSVs, prompt sets, caption builders, the data directory."""
from .datasets import (
                       DATA_ENV, default_data_dir, resolve_data_path, read_csv_table, is_missing_label,
                       labelled_indices, to_rgb, load_rgb, LabelledImages, TextPrompts, parse_where,
                       CAPTION_TEMPLATES, label_caption)
