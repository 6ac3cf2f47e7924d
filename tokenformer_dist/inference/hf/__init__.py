"""Hugging Face integration: the exported folder's transformers classes and the exporter (`export`).

The modules `configuration_tokenformer`, `modeling_tokenformer` and `tokenization_tokenformer` are written
for transformers and import the project's own model; `export.export_hf` copies them, together with the
model modules they import (imports made relative), into the exported folder. Importing them needs the
`[hf]` extra (transformers).
"""
