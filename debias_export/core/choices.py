"""Every choice list the CLI, recipes and validators share, in one place (no torch: the CLI reads them at --help).

The registries they mirror check against these (``edits`` kinds, SAE modes, fold modes, ONNX exporters),
and tests assert that each list equals what its registry accepts.
"""

EDIT_KINDS = ("sae", "projection")  # == edits.registered_edit_kinds()
SAE_MODES = ("reconstruct", "residual")
SAE_CONTROLS = ("reconstruction", "random")  # eval.controls: what an SAE edit is compared with (workflow.controls)
FOLD_MODES = ("site", "output", "every_writer")  # where a projection can be folded into weights
EXPORT_FOLDS = ("none", *FOLD_MODES)  # what a projection edit records for export: "none" = runtime patch
PROJECTION_METHODS = {"leace": "leace", "mean-diff": "mean_diff"}  # CLI spelling -> analysis.leace method
TOKEN_MODES = ("random-k", "output", "all")  # which token positions a capture keeps
CAPTURE_DTYPES = ("float32", "float16", "bfloat16")
PRECISIONS = ("fp32", "bf16", "fp16")  # compute precision (autocast) of capture; weights stay fp32
TRAIN_PRECISIONS = ("fp32", "bf16")  # SAE training: fp16 would need loss scaling
ONNX_EXPORTERS = ("dynamo", "torchscript", "optimum")
DEFAULT_EXPORTER = "dynamo"
BENCH_EXPORTERS = ("dynamo", "torchscript")  # optimum needs transformers<4.58: not a benchmark route
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")
TOWERS = ("image", "text")
PVALUE_CORRECTIONS = ("bh", "bonferroni")
DEFAULT_OPSET = 20
MIN_OPSET = {"dynamo": 18, "torchscript": 17, "optimum": 17}  # per exporter
MAX_OPSET = {"dynamo": 23, "torchscript": 20, "optimum": 20}
HUB_ENV = "DEBIAS_EXPORT_ALLOW_HUB"  # "1": model specs may download from the Hugging Face hub (default: offline)
BUILTIN_MODEL_SPECS = ("tiny-clip", "tiny-open-clip", "tiny-llava", "tiny-dual-encoder", "biaslab",
                       "arch:clip-vit-base-patch16", "arch:clip-vit-large-patch14-336")  # == workflow.model_specs.known_specs()
