"""Exp 1: how linearly decodable is gender at each candidate site (UTKFace probing data only)?

Held-out accuracy (30% stratified split) of a logistic probe on: the per-input mean over tokens, the
output token (CLS, the only position a last-block edit touches), and the tower embedding.
Writes results/exp1_decodability.json.
"""
from __future__ import annotations

from pathlib import Path

from debias_export.analysis.leace import probe_accuracy, split_indices
from study_common import SOURCES, capture, embed_inputs, gender_ids, lab, save_json

OUT = Path(__file__).parent / "results"


def acc(x, y) -> float:
    tr, te = split_indices(len(y), 0.3, seed=0, labels=y)
    return probe_accuracy(x[tr], y[tr], x[te], y[te])


def main() -> None:
    a = lab()
    res = {}
    plan = [("image", "utk_images", range(4)), ("text", "utk_captions", range(6)), ("text", "gender_words", range(6))]
    for tower, source, layers in plan:
        for layer in layers:
            st = capture(a, f"{tower}.{layer}", source)
            y = gender_ids(st.labels("gender"))
            res[f"{source}/{tower}.{layer}"] = {"mean": acc(st.mean_activations(), y), "output": acc(st.output_activations(), y),
                                                "n": len(y), "majority": float(max(y.float().mean(), 1 - y.float().mean()))}
            print(source, layer, res[f"{source}/{tower}.{layer}"], flush=True)
        emb = embed_inputs(a, tower, SOURCES[source]())
        res[f"{source}/{tower}.embedding"] = {"output": acc(emb, y)}
        print(source, "embedding", res[f"{source}/{tower}.embedding"], flush=True)
    save_json(OUT / "exp1_decodability.json", res)


if __name__ == "__main__":
    main()
