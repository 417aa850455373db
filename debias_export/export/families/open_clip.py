"""Export specs of family ``open_clip``: an HF-style directory without remote code (open_clip's own
config + safetensors, loadable by ``open_clip.create_model('local-dir:...')``) and one ONNX graph per tower."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...adapters.open_clip_family import OpenCLIPAdapter, base_info, load_base, save_base
from ..hf_dir import HFDirSpec, register_hf_spec
from ..onnx_specs import GraphSpec, register_onnx_spec


class OpenCLIPTowerGraph(nn.Module):
    """ONNX graph of one tower: ``pixel_values -> image_embeds`` or ``input_ids -> text_embeds``.

    ``encode_image`` / ``encode_text`` of the live (patched) model, not normalised. Runs
    ``nn.MultiheadAttention``'s standard path: its inference fast path is one fused op
    (``_native_multi_head_attention``) that has no ONNX export, and validation then compares like with like.
    """

    def __init__(self, model: nn.Module, tower: str):
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                **_: Any) -> dict[str, torch.Tensor]:
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            if self.tower == "image":
                return {"image_embeds": self.model.encode_image(pixel_values)}
            return {"text_embeds": self.model.encode_text(input_ids)}
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)


def example_inputs(adapter: OpenCLIPAdapter, tower: str, batch: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random valid tower inputs. Text rows are always ``context_length`` wide (open_clip's fixed
    positional table; ``seq`` is ignored) with the pooled EOT token at a random per-row position."""
    if tower == "image":
        return {"pixel_values": torch.randn(batch, 3, *adapter.model.visual.image_size, generator=g)}
    width = int(adapter.model.context_length)
    text = adapter._text_module()
    pool = text.text_pool_type if text is adapter.model else text.pool_type
    vocab = int(adapter.model.vocab_size)
    eot = adapter._eos_id() if pool == "eos" else vocab - 1  # argmax pooling: EOT must be the highest id
    ids = torch.randint(1, max(2, min(eot, vocab - 1)), (batch, width), generator=g)
    lengths = torch.randint(2, width + 1, (batch,), generator=g)
    lengths[0] = width
    ids = torch.where(torch.arange(width)[None, :] < lengths[:, None], ids, torch.zeros_like(ids))
    ids[torch.arange(batch), lengths - 1] = eot
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids.long(), "attention_mask": mask}


def onnx_graphs(adapter: OpenCLIPAdapter) -> list:
    """``GraphSpec``s for :mod:`debias_export.export.onnx_export`: dynamic batch; the text length is fixed."""
    specs = []
    for tower, name, inp, out in (("image", "image_encoder", "pixel_values", "image_embeds"),
                                  ("text", "text_encoder", "input_ids", "text_embeds")):
        if tower in adapter.towers():
            specs.append(GraphSpec(name, tower, {inp: {0: "batch_size"}}, {out: {0: "batch_size"}},
                                   lambda a, t=tower: OpenCLIPTowerGraph(a.model, t),
                                   lambda a, b, s, g, t=tower: example_inputs(a, t, b, s, g)))
    return specs


register_hf_spec(HFDirSpec(OpenCLIPAdapter.family, save_base, load_base, base_info, auto_class=None))
register_onnx_spec(OpenCLIPAdapter.family)(onnx_graphs)
