"""Progressive scaling on disk: which parameter tokens a model gains and the new rows' values (`tokens`), the
weights grown and resharded one tensor at a time (`expand`), Adam state carried through growth (`optimizer`)
and the command line behind tools/expand_tokens.py (`cli`)."""
