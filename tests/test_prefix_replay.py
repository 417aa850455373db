"""PrefixTrace: an edited run that replays the unedited blocks gives the very tensors a full run gives, and
replays nothing when that could be wrong (weights folded, another batch, hooks inside the prefix)."""
from __future__ import annotations

import pytest
import torch

from debias_export import ProjectionEdit, SAEEdit
from debias_export.adapters.dual_encoder import DualEncoderAdapter, tiny_dual_encoder_config
from debias_export.core.errors import DebiasError
from debias_export.edits.install import edits_installed
from debias_export.eval.prefix_replay import PrefixTrace
from debias_export.workflow.testing import random_sae

W = 32


@pytest.fixture(scope="module")
def dual():
    return DualEncoderAdapter.from_config(tiny_dual_encoder_config(width=W, layers=3), seed=0)


def _pixels(seed: int, n: int = 4) -> dict:
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def _texts(dual) -> dict:
    gen = torch.Generator().manual_seed(5)
    vocab = int(dual._tower_config("text").vocab_size)
    ids = torch.randint(5, vocab, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding: the mask reaches every block and must match too
    return {"input_ids": ids, "attention_mask": mask}


def _run(dual, tower, batches, edit=None, trace=None, site=None):
    with torch.no_grad():
        if edit is None:
            return [dual.embed(tower, b) for b in batches]
        with edits_installed(dual, edit):
            if trace is None:
                return [dual.embed(tower, b) for b in batches]
            with trace.replaying(dual, site or edit.site):
                return [dual.embed(tower, b) for b in batches]


def _record(dual, tower, batches) -> PrefixTrace:
    trace = PrefixTrace()
    with torch.no_grad(), trace.recording(dual, tower):
        [dual.embed(tower, b) for b in batches]
    return trace


@pytest.mark.parametrize("site", ["image.0", "image.1", "image.2", "image.0.attn_out", "image.1.attn_out", "image.2.mlp_out"])
@pytest.mark.parametrize("mode", ["residual", "reconstruct"])
def test_image_edits_replay_to_the_full_runs_tensors(dual, site, mode):
    batches = [_pixels(1), _pixels(2, n=3)]
    trace = _record(dual, "image", batches)
    edit = SAEEdit(site=site, sae=random_sae(W, 128, seed=3), neurons=[1, 5, 9], value=0.0, alpha=0.7, mode=mode)
    full = _run(dual, "image", batches, edit)
    fast = _run(dual, "image", batches, edit, trace)
    assert all(torch.equal(a, b) for a, b in zip(full, fast))
    kind = site.split(".")[2] if site.count(".") == 2 else "resid_post"
    replays = not (kind != "resid_post" and site.split(".")[1] == "0")
    assert (trace.hits, trace.misses) == ((2, 0) if replays else (0, 0))
    assert not _run(dual, "image", batches[:1])[0].equal(full[0])  # the edit does change the output


def test_text_tower_with_padding_replays_exactly(dual):
    batches = [_texts(dual)]
    trace = _record(dual, "text", batches)
    edit = SAEEdit(site="text.1", sae=random_sae(W, 128, seed=4), neurons=[0, 2], value=0.0, alpha=1.0, mode="reconstruct")
    assert torch.equal(_run(dual, "text", batches, edit)[0], _run(dual, "text", batches, edit, trace)[0])
    assert trace.hits == 1
    # the same ids under another mask are another batch: computed, not replayed
    other = {**batches[0], "attention_mask": torch.ones_like(batches[0]["attention_mask"])}
    assert torch.equal(_run(dual, "text", [other], edit)[0], _run(dual, "text", [other], edit, trace)[0])
    assert (trace.hits, trace.misses) == (1, 1)


def test_unrecorded_batches_and_other_towers_are_computed(dual):
    trace = _record(dual, "image", [_pixels(1)])
    edit = SAEEdit(site="image.1", sae=random_sae(W, 128, seed=3), neurons=[1], value=0.0, alpha=1.0)
    new = [_pixels(7)]
    assert torch.equal(_run(dual, "image", new, edit)[0], _run(dual, "image", new, edit, trace)[0])
    assert (trace.hits, trace.misses) == (0, 1)
    text_edit = SAEEdit(site="text.1", sae=random_sae(W, 128, seed=3), neurons=[1], value=0.0, alpha=1.0)
    assert torch.equal(_run(dual, "text", [_texts(dual)], text_edit)[0],
                       _run(dual, "text", [_texts(dual)], text_edit, trace)[0])  # nothing recorded for text


def test_weights_folded_into_the_prefix_are_never_replayed(dual):
    batches = [_pixels(1)]
    trace = _record(dual, "image", batches)
    q = torch.linalg.qr(torch.randn(W, 2, generator=torch.Generator().manual_seed(0)))[0]
    fold = ProjectionEdit(site="image.1", in_dirs=q, out_dirs=q, mu=torch.zeros(W), fold="every_writer")
    full = _run(dual, "image", batches, fold)
    fast = _run(dual, "image", batches, fold, trace)
    assert torch.equal(full[0], fast[0]) and trace.hits == 0
    # undone, the weights are the recorded ones again (same values, new version counters): replay resumes
    edit = SAEEdit(site="image.1", sae=random_sae(W, 128, seed=3), neurons=[1], value=0.0, alpha=1.0)
    assert torch.equal(_run(dual, "image", batches, edit)[0], _run(dual, "image", batches, edit, trace)[0])
    assert trace.hits == 1


def test_a_hook_inside_the_prefix_disables_replay(dual):
    batches = [_pixels(1)]
    trace = _record(dual, "image", batches)
    edit = SAEEdit(site="image.2", sae=random_sae(W, 128, seed=3), neurons=[1], value=0.0, alpha=1.0)
    seen = []
    handle = dual.blocks("image")[1].register_forward_hook(lambda m, a, o: seen.append(1))
    try:
        assert torch.equal(_run(dual, "image", batches, edit)[0], _run(dual, "image", batches, edit, trace)[0])
    finally:
        handle.remove()
    assert trace.hits == 0 and len(seen) == 2  # the hook ran in both runs


def test_recording_refuses_an_edited_model_and_forwards_are_restored(dual):
    edit = SAEEdit(site="image.1", sae=random_sae(W, 128, seed=3), neurons=[1], value=0.0, alpha=1.0)
    with edits_installed(dual, edit), pytest.raises(DebiasError, match="unmodified"):
        with PrefixTrace().recording(dual, "image"):
            pass
    trace = _record(dual, "image", [_pixels(1)])
    _run(dual, "image", [_pixels(1)], edit, trace)
    assert not any("forward" in b.__dict__ for b in dual.blocks("image"))


def test_the_memory_budget_bounds_what_is_kept(dual):
    trace = PrefixTrace(max_bytes=1)
    with torch.no_grad(), trace.recording(dual, "image"):
        dual.embed("image", _pixels(1))
    edit = SAEEdit(site="image.1", sae=random_sae(W, 128, seed=3), neurons=[1], value=0.0, alpha=1.0)
    assert torch.equal(_run(dual, "image", [_pixels(1)], edit)[0], _run(dual, "image", [_pixels(1)], edit, trace)[0])
    assert trace.bytes == 0 and trace.hits == 0


def test_the_protocol_replays_and_chooses_and_reports_exactly_as_without(tmp_path, shared_data, monkeypatch):
    """A protocol run (grid over sites, eval, sweep, controls) with replay: the same selection table and eval
    numbers as the same run computing every block, and replay did happen."""
    import contextlib
    import json

    from debias_export.cli.main import main
    from test_protocol import _protocol_recipe

    traces = []
    real = PrefixTrace.replaying

    def counted(self, adapter, site):
        traces.append(self)
        return real(self, adapter, site)

    def results(name, replay):
        monkeypatch.setattr(PrefixTrace, "replaying", counted if replay else
                            lambda self, adapter, site: contextlib.nullcontext(self))
        extra = {"select": {"limit": 40, "k": 5, "grid": {"site": ["image.0", "image.1"], "edit.alpha": [0.3, 1.0]}},
                 "eval": {"alphas": [0.0, 1.0], "k": 5, "limit": 30, "controls": ["reconstruction", "random"]},
                 "output": {"dir": str(tmp_path / name / "out")}}
        assert main(["run", str(_protocol_recipe(tmp_path / name, shared_data, **extra)), "--no-progress"]) == 0
        summary = json.loads((tmp_path / name / "out" / "summary.json").read_text())[0]
        for key in ("steps", "bench"):
            summary.pop(key, None)
        return summary, json.loads((tmp_path / name / "out" / "selection.json").read_text())["cells"]

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert results("a", replay=True) == results("b", replay=False)
    assert sum(t.hits for t in set(traces)) > 0 and sum(t.misses for t in set(traces)) == 0


def test_a_tower_that_stops_early_keeps_what_it_ran(dual):
    """A tower that reads a middle layer never runs its last block: its batches are kept up to where they got,
    and replay uses them for edits up to there (and computes for edits past it)."""
    class Stop(Exception):
        pass

    def stop(module, args, output):
        raise Stop

    trace = PrefixTrace()
    batches = [_pixels(1), _pixels(2)]
    handle = dual.blocks("image")[1].register_forward_hook(stop)
    with torch.no_grad(), trace.recording(dual, "image"):
        for b in batches:
            with pytest.raises(Stop):
                dual.embed("image", b)
    handle.remove()
    early = SAEEdit(site="image.0", sae=random_sae(W, 128, seed=3), neurons=[1], value=0.0, alpha=1.0)
    late = SAEEdit(site="image.2", sae=random_sae(W, 128, seed=3), neurons=[1], value=0.0, alpha=1.0)
    assert all(torch.equal(a, b) for a, b in zip(_run(dual, "image", batches, early), _run(dual, "image", batches, early, trace)))
    assert (trace.hits, trace.misses) == (2, 0)
    assert all(torch.equal(a, b) for a, b in zip(_run(dual, "image", batches, late), _run(dual, "image", batches, late, trace)))
    assert (trace.hits, trace.misses) == (2, 2)
