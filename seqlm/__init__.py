"""The pretraining pipeline's code, in the order a run goes through it; the top-level scripts are thin entry points.

    seqlm/data/        download, validate and cut the corpus, tokenize it once (token and SFT caches), the demo data
    seqlm/evaluation/  held-out loss and bits per character, standard benchmarks (lm-eval), the run report
    seqlm/training/    arguments, what a run is, fitting it to the card, the Trainer and its callbacks, checkpoints
    seqlm/serving/     the OpenAI-compatible server and its chat page
    seqlm/*.py         what every stage uses: paths, crash-safe files, the output folder's layout, the model,
                       the tokenizer, the device

Imports go one way: data imports only the shared modules; evaluation, data too; training, evaluation too (a run
measures as it trains); serving, data and the shared modules. tests/test_layout.py holds the rule.
"""
