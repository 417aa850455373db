"""Where does a patch's time go? ORT profiler on the patched graph, per batch size.

For each batch size, runs the exported patched graph under onnxruntime's profiler and reports the
time spent in the patch's own nodes (the edit plus the position-pruning glue: Slice/Concat for CLS,
Gather/ScatterElements for EOS), by op type, against the rest of the same runs. Measured within
one session, so load drift on a shared machine cancels. Usage::

    .venv/bin/python benchmarks/profile_patch.py --arch clip-vit-base-patch16 --tower text \
        --site text.-1 --mode reconstruct --batch-sizes 1,8,32

writes ``benchmarks/results/profile-<arch>-<site>-<mode>-b<batches>.json`` and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="clip-vit-base-patch16")
    p.add_argument("--tower", default="text")
    p.add_argument("--site", default="text.-1")
    p.add_argument("--mode", default="reconstruct")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    import torch

    from debias_export.bench.patchsets import PatchSet, VariantSwitch
    from debias_export.bench.runners import machine_info, ort_profile
    from debias_export.bench.towers import bench_inputs, export_variants
    from debias_export.cli.bench import random_sae_edits
    from debias_export.adapters.real_configs import random_clip

    torch.set_num_threads(a.threads)
    if a.arch == "llava-1.5-7b":
        from debias_export.bench.towers import random_llava_vision

        adapter = random_llava_vision()
    else:
        adapter = random_clip(a.arch, tower=a.tower)
    ps = PatchSet.compile(a.mode, adapter, random_sae_edits(adapter, [a.mode], [a.site], 8, 5)[a.mode])
    switch = VariantSwitch(adapter.model, {"unmodified": None, a.mode: ps})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_variants(adapter, a.tower, switch, Path(tmp))
        for b in [int(x) for x in a.batch_sizes.split(",")]:
            inputs = bench_inputs(adapter, a.tower, b)
            prof = ort_profile(paths[a.mode], inputs, runs=a.runs, threads=a.threads,
                               patch_modules=[m for m, _, _ in ps.entries])
            # the unmodified graph too: per-op totals outside the patch should match it (a fusion the
            # patch blocks would show up as a difference here, not in the patch nodes)
            base = ort_profile(paths["unmodified"], inputs, runs=a.runs, threads=a.threads)
            rows.append({"batch": b, **prof, "unmodified_ms_total": base["ms_total"],
                         "unmodified_ms_by_op": base["ms_by_op"]})
            delta = {k: prof["ms_by_op"].get(k, 0) - base["ms_by_op"].get(k, 0)
                     for k in set(prof["ms_by_op"]) | set(base["ms_by_op"])}
            top = sorted(delta.items(), key=lambda kv: -abs(kv[1]))[:5]
            print(f"batch {b}: unmodified total {base['ms_total']:.1f} ms; op-type deltas (patched - unmodified, "
                  "separate runs): " + ", ".join(f"{k} {v:+.2f}" for k, v in top))
            print(f"batch {b}: total {prof['ms_total']:.1f} ms, patch {prof['ms_patch']:.2f} ms "
                  f"-> implied ratio {1 + prof['patch_over_rest']:.4f}; patch by op: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in list(prof["ms_patch_by_op"].items())[:5]))
    del switch
    out = RESULTS / f"profile-{a.arch}-{a.site}-{a.mode}-b{a.batch_sizes.replace(',', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "machine": machine_info(a.threads), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
