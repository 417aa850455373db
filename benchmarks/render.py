"""Re-render ``bench.md`` and ``bench_latency.png`` from a results folder's ``bench.json`` (in place).

Usage: ``.venv/bin/python benchmarks/render.py benchmarks/results/<case> [...]``. Useful after the
report format changes; the measurements in ``bench.json`` are not touched.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from debias_export.bench import headline
    from debias_export.bench.report import markdown, plot

    for d in map(Path, argv):
        result = json.loads((d / "bench.json").read_text())
        result["headline"] = headline(result)
        (d / "bench.md").write_text(markdown(result))
        plot(result, d / "bench_latency.png")
        print(f"rendered {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
