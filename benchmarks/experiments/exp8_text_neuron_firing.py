"""Exp 8 (diagnosis only, no selection): do the text tower's gender neurons fire on neutral prompts at all?

For the text.5 SAEs (random-k tokens / output token), neurons chosen on UTKFace captions or gendered words
(exclusive rule, tau 0.1, top_n 3, output-token latents): fraction of inputs whose CLS activates any chosen
neuron, and the mean summed activation, on captions, gendered words and the occupations prompts.
Writes results/exp8.json.
"""
from __future__ import annotations

from pathlib import Path

from debias_export.capture import ActivationStore, capture_activations
from debias_export.data.datasets import TextPrompts
from study_common import CACHE, DATA, capture, lab, sae_for, save_json
from study_edits import latents, probe

OUT = Path(__file__).parent / "results"


def main() -> None:
    a = lab()
    occ_dir = CACHE / "capture-occupations-text.5-output"
    capture_activations(a, "text.5", TextPrompts(DATA / "prompts" / "occupations.csv"), occ_dir, tokens="output",
                        batch_size=128, progress=False)
    sets = {"utk_captions": capture(a, "text.5", "utk_captions"), "gender_words": capture(a, "text.5", "gender_words"),
            "occupations (eval prompts)": ActivationStore(occ_dir)}
    st_tok = sets["utk_captions"]
    saes = {"tokens": sae_for(st_tok, "utk_captions-text.5"),
            "output": sae_for(capture(a, "text.5", "utk_captions", tokens="output", k=1), "utk_captions-text.5-outputtok")}
    res = {}
    for sname, sae in saes.items():
        for src in ("utk_captions", "gender_words"):
            neurons, _ = probe(sae, sets[src], "output", tau=0.1, top_n=3)
            for ename, st in sets.items():
                f = latents(sae, st.output_activations())[:, neurons]
                key = f"SAE({sname}) neurons from {src} -> {ename}"
                res[key] = {"neurons": neurons, "fire_rate": float((f > 0).any(1).float().mean()),
                            "mean_sum_activation": float(f.sum(1).mean())}
                print(key, res[key], flush=True)
    save_json(OUT / "exp8.json", res)


if __name__ == "__main__":
    main()
