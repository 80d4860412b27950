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

import atexit
import gc

# The interpreter's last garbage collection walks every object torch, transformers and DeepSpeed made: 1.3 s at the
# end of each training rank, about 1 s for any script here, spent after all output is written and closed. Frozen
# objects are skipped by it (memory is the system's to take back); atexit handlers registered later (swanlab's
# finish, logging's flush) run before this one.
atexit.register(gc.freeze)
