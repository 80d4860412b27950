"""swanlab: one run per training job, started on the first process only, never waiting on a login prompt."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from seqlm import outputs
from seqlm.fileio import atomic_output

log = logging.getLogger(__name__)
MODES = ("cloud", "local", "offline", "disabled")


def swanlab_mode() -> str:
    """SWANLAB_MODE if set; else cloud with an API key, local when the dashboard is installed, offline otherwise."""
    import swanlab

    has_key = bool(swanlab.Settings().api_key)  # SWANLAB_API_KEY, or a `swanlab login` saved in .netrc
    mode = os.environ.get("SWANLAB_MODE")
    if not mode:
        return "cloud" if has_key else "local" if importlib.util.find_spec("swanboard") else "offline"
    if mode not in MODES:
        raise ValueError(f"SWANLAB_MODE={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "cloud" and not has_key:
        # swanlab would ask for a key on the terminal, and the other ranks would time out waiting.
        raise ValueError("SWANLAB_MODE=cloud needs SWANLAB_API_KEY (or `swanlab login` once); "
                         "or use SWANLAB_MODE=local / offline")
    return mode


def start_swanlab(output_dir: str, run_name: str | None, config: dict, mode: str,
                  project: str = "seq-monkey-pretrain") -> str:
    """Start the run that transformers' SwanLabCallback then logs to (it cannot start one itself with swanlab
    0.10: its get_run() raises before init). A rerun in the same output dir continues the same run id. Returns the
    log folder."""
    import swanlab

    log_dir = os.environ.get("SWANLAB_LOG_DIR") or os.path.join(output_dir, "swanlog")
    saved = outputs.swanlab_run(output_dir)
    run_id = os.environ.get("SWANLAB_RUN_ID") or (saved["id"] if saved else None)
    # SWANLAB_PROJECT_NAME is swanlab's own variable (SWANLAB_PROJECT makes swanlab 0.10's settings fail to parse).
    run = swanlab.init(project=os.environ.get("SWANLAB_PROJECT_NAME", project), name=run_name, mode=mode,
                       log_dir=log_dir, config=config, id=run_id, resume="allow" if run_id else None)
    with atomic_output(Path(output_dir) / outputs.SWANLAB_RUN_FILE) as tmp:
        tmp.write_text(json.dumps({"id": run.id, "mode": mode, "log_dir": log_dir}) + "\n")
    log.info("swanlab %s run %s%s, logs in %s%s", mode, run.id, " (continued)" if run_id else "", log_dir,
             f" (view: swanlab watch {log_dir})" if mode == "local" else "")
    return log_dir
