"""How good a model is: held-out loss and bits per character and byte, standard benchmarks through lm-evaluation-
harness, and the run report with its provenance."""
