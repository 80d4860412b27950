"""Shared code of the pretraining pipeline; the top-level scripts are thin entry points over it."""
