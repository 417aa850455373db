"""Data sources: the data directory, strict CSV and image readers, labelled image sets, prompt sets, captions."""
from .captions import (AGE_GROUPS, CAPTION_TEMPLATES, FAIRFACE_AGE_WORDS, FAIRFACE_RACE_WORDS, RACE_WORDS, age_group,
                       fairface_caption, label_caption)
from .datasets import (DATA_ENV, LabelledImages, TextPrompts, default_data_dir, is_missing_label, labelled_indices,
                       load_rgb, parse_where, read_csv_table, resolve_data_dir, resolve_data_path, to_rgb)

__all__ = ["AGE_GROUPS", "CAPTION_TEMPLATES", "FAIRFACE_AGE_WORDS", "FAIRFACE_RACE_WORDS", "RACE_WORDS", "age_group",
           "fairface_caption", "label_caption", "DATA_ENV", "LabelledImages", "TextPrompts", "default_data_dir",
           "is_missing_label", "labelled_indices", "load_rgb", "parse_where", "read_csv_table", "resolve_data_dir",
           "resolve_data_path", "to_rgb"]
