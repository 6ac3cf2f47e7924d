"""The progressive-scaling experiment in miniature (docs/progressive_scaling.md): ladder config (`ladder`),
FLOP accounting and matched-compute comparisons (`accounting`), subprocess runner of the real trainer and
expansion tool (`runner`), the plan of runs and their collection (`experiment`), the report (`report`) and the
command line (`cli`, behind tools/progressive_experiment.py)."""
