"""Write a benchmark result as ``bench.json`` + ``bench.md`` + ``bench_latency.png`` (atomically)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..export.manifest import atomic_output_dir

BASELINE = "unmodified"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.2f}"


def _fmt_flops(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3f} {unit}"
    return str(int(x))


def markdown(result: dict[str, Any]) -> str:
    """Human-readable tables: headline ratios, latency per variant, FLOPs/params, skips, machine."""
    m, s = result["machine"], result["settings"]
    lines = [f"# debias-export bench ({result['date']})", "",
             f"Model: `{result['model'].get('source')}` ({result['model'].get('family')}); "
             f"variants: {', '.join(s['variants'])}.",
             f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} ({m['torch_threads']} threads), "
             f"onnxruntime {m.get('onnxruntime')} ({m['ort_intra_op_threads']} intra-op threads, graph opt "
             f"`{s['ort_graph_optimization']}`); CUDA: {m.get('cuda') or 'none'}; load avg at start {m.get('loadavg')}.",
             f"Timing: {s['warmup']} warm-up + {s['reps']} reps per variant, {s['order']}.", "",
             "## Headline: patched / unmodified", "",
             "| tower | runtime | dtype | batch | variant | ratio of medians | paired median [p10, p90] | paired median 95% CI | FLOPs ratio |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for h in result.get("headline", []):
        fr = "-" if h["flops_ratio"] is None else f"{h['flops_ratio']:.5f}"
        ci = h.get("paired_median_ci95")
        ci = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n<6"
        lines.append(f"| {h['tower']} | {h['runtime']} | {h['dtype']} | {h['batch']} | {h['variant']} | "
                     f"{h['ratio_of_medians']:.4f} | {h['paired_median']:.4f} [{h['paired_p10']:.3f}, {h['paired_p90']:.3f}] | {ci} | {fr} |")
    lines += ["", "## Latency (ms per call)", "",
              "| tower | runtime | dtype | batch | variant | median | IQR | p10 | p90 | n |",
              "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["latency"]:
        q = r["summary"]
        lines.append(f"| {r['tower']} | {r['runtime']} | {r['dtype']} | {r['batch']} | {r['variant']} | {_ms(q['median'])} | "
                     f"{_ms(q['iqr'])} | {_ms(q['p10'])} | {_ms(q['p90'])} | {q['n']} |")
    if result["flops"]:
        lines += ["", "## FLOPs (matmul-family, 2*m*n*k) and parameters", "",
                  f"Model parameters: {result['params']['model']:,}. "
                  + "; ".join(f"{n}: +{v['edit_params']:,} edit elements" for n, v in result["variants"].items()), "",
                  "| tower | batch | variant | torch FLOPs | ONNX FLOPs | torch ratio | ONNX ratio | ONNX unresolved |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for f in result["flops"]:
            tr = f"{f['torch_ratio']:.6f}" if "torch_ratio" in f else "-"
            orr = f"{f['onnx_ratio']:.6f}" if "onnx_ratio" in f else "-"
            lines.append(f"| {f['tower']} | {f['batch']} | {f['variant']} | {_fmt_flops(f['torch_flops'])} | "
                         f"{_fmt_flops(f.get('onnx_flops'))} | {tr} | {orr} | {f.get('onnx_unresolved', '-')} |")
    if result.get("checks"):
        lines += ["", "## Checks (the edit is in each benchmarked graph)", "",
                  "| tower | runtime | dtype | variant | max abs diff vs unmodified |", "|---|---|---|---|---:|"]
        lines += [f"| {c['tower']} | {c['runtime']} | {c['dtype']} | {c['variant']} | {c['max_abs_diff_vs_unmodified']:.3g} |"
                  for c in result["checks"]]
    if result.get("profiles"):
        lines += ["", "## ORT profile (ms per call by op type, top 6; patch nodes measured within the same runs)", ""]
        for p in result["profiles"]:
            ops = sorted(p["ms_by_op"].items(), key=lambda kv: -kv[1])  # JSON round trips sort keys by name
            top = ", ".join(f"{k} {v:.2f}" for k, v in ops[:6])
            share = "" if p["variant"] == BASELINE or p.get("patch_over_rest") is None else (
                f"; patch nodes {p['ms_patch']:.2f} ms = {100 * p['patch_over_rest']:.2f}% of the rest "
                f"(implied ratio {1 + p['patch_over_rest']:.4f})")
            lines.append(f"- {p['tower']} {p['variant']} batch {p['batch']}: total {p.get('ms_total', 0):.1f} ms; {top}{share}")
    if result["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- {k['tower']} {k['runtime']} {k['dtype']}: {k['reason']}" for k in result["skipped"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Per tower x runtime x dtype: median latency vs batch (p10-p90 band) on top, the paired
    patched/unmodified ratio (median, p10-p90 bars) below, where a 1% difference is visible."""
    import matplotlib  # heavy; only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, dict[str, list]] = {}
    for r in result["latency"]:
        groups.setdefault((r["tower"], r["runtime"], r["dtype"]), {}).setdefault(r["variant"], []).append(r)
    n = max(1, len(groups))
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.4), squeeze=False, sharex="col")
    for col, ((tower, runtime, dtype), variants) in enumerate(sorted(groups.items())):
        ax, rax = axes[0][col], axes[1][col]
        for name, rows in variants.items():
            rows = sorted(rows, key=lambda r: r["batch"])
            b = [r["batch"] for r in rows]
            med = [1000 * r["summary"]["median"] for r in rows]
            ax.plot(b, med, marker="o", label=name, linestyle="--" if name == BASELINE else "-")
            ax.fill_between(b, [1000 * r["summary"]["p10"] for r in rows], [1000 * r["summary"]["p90"] for r in rows], alpha=0.2)
            if name != BASELINE:
                med = [r["ratio"]["paired_median"] for r in rows]
                err = [[m - r["ratio"]["paired_p10"] for m, r in zip(med, rows)],
                       [r["ratio"]["paired_p90"] - m for m, r in zip(med, rows)]]
                rax.errorbar(b, med, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{tower} / {runtime} / {dtype}")
        ax.legend(fontsize=7)
        rax.axhline(1.0, color="grey", linewidth=0.8)
        rax.set_xlabel("batch size")
        rax.set_ylabel("patched / unmodified (paired)")
        rax.legend(fontsize=7)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no latency rows", ha="center")
        axes[1][0].set_axis_off()
    fig.suptitle(f"{result['model'].get('source')}: patched vs unmodified", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict[str, Any], out_dir: Path, overwrite: bool = False) -> Path:
    """Write the three files into ``out_dir`` via a temp dir + rename (never a half-written output)."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        (tmp / "bench.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        (tmp / "bench.md").write_text(markdown(result))
        plot(result, tmp / "bench_latency.png")
    return out_dir
