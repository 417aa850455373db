"""Export specs of family ``hf_dual_encoder`` (VisionTextDualEncoderModel: CLIP vision + BERT text): HF directory
with remote code for ``AutoModel`` and one ONNX graph per tower."""
from __future__ import annotations

import torch
from torch import nn

from ...adapters.dual_encoder import DualEncoderAdapter, base_info, load_base, save_base
from ...adapters.transformers_compat import pooled
from ..hf_dir import HFDirSpec, register_hf_spec
from ..onnx_specs import GraphSpec, register_onnx_spec


class DualTower(nn.Module):
    """One tower of the dual encoder as an ONNX-exportable module (shares the live, possibly patched, model)."""

    def __init__(self, model: nn.Module, tower: str):
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.tower == "image":
            return {"image_embeds": pooled(self.model.get_image_features(pixel_values=pixel_values))}
        # Explicit token_type_ids: BERT otherwise slices a buffer by a Python int, frozen at trace time.
        return {"text_embeds": pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                                                   token_type_ids=torch.zeros_like(input_ids)))}


def _image_inputs(adapter, batch: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    size = adapter.image_size()
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def _text_inputs(adapter, batch: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """[CLS] words [SEP] then padding, with per-row lengths (BERT vocab: ids 1000+ are word pieces)."""
    cfg = adapter._tower_config("text")
    seq = max(3, min(seq, int(cfg.max_position_embeddings)))
    vocab = int(cfg.vocab_size)
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch, seq), generator=g)
    lengths = torch.randint(3, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids[:, 0] = min(101, vocab - 1)
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    ids[torch.arange(batch), lengths - 1] = min(102, vocab - 1)
    return {"input_ids": ids, "attention_mask": mask}


def onnx_graphs(adapter: "DualEncoderAdapter") -> list:
    text_axes = {0: "batch_size", 1: "sequence_length"}
    return [GraphSpec("vision_model", "image", {"pixel_values": {0: "batch_size"}}, {"image_embeds": {0: "batch_size"}},
                      lambda a: DualTower(a.model, "image"), _image_inputs),
            GraphSpec("text_model", "text", {"input_ids": dict(text_axes), "attention_mask": dict(text_axes)},
                      {"text_embeds": {0: "batch_size"}}, lambda a: DualTower(a.model, "text"), _text_inputs)]


register_hf_spec(HFDirSpec(DualEncoderAdapter.family, save_base, load_base, base_info, auto_class="AutoModel"))
register_onnx_spec(DualEncoderAdapter.family)(onnx_graphs)
