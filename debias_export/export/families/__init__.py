"""Per-family export specs (HF directory + ONNX graphs), one module per family, named after it.

Each imports the export machinery and the family's adapter and registers its specs at import;
:func:`debias_export.export.registry.load_family_specs` imports it on first use.
"""
