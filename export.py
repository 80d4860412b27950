"""Export a checkpoint to GGUF, the file llama.cpp, ollama and LM Studio run, with an ollama Modelfile beside it.

    make gguf-setup                                  # once: llama-cpp-python and llama.cpp's converter, into .venv
    python export.py                                 # output/sft -> output/sft-gguf/model-f16.gguf + Modelfile
    python export.py --outtype q8_0                  # output/sft-gguf/model-q8_0.gguf: half the size
    python export.py --model_path output/pretrain    # a pretrained checkpoint: a text model (no chat template)

Then: `ollama create seqlm -f output/sft-gguf/Modelfile && ollama run seqlm`, or open the .gguf in LM Studio or
llama.cpp (`llama-cli -m output/sft-gguf/model-f16.gguf`; a text model: `llama-completion`). Other types (Q4_K_M, ...) come from llama.cpp's
`llama-quantize` run on the f16 file. The conversion is llama.cpp's own convert_hf_to_gguf.py (seqlm/serving/gguf.py).
"""
import argparse
import sys

from seqlm import paths
from seqlm.serving.gguf import MODELFILE, OUTTYPES, install_converter, plan_export, run_export


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(paths.SFT_OUTPUT), help="checkpoint folder (default: %(default)s)")
    p.add_argument("--outtype", default="f16",
                   help=f"weight type: {', '.join(OUTTYPES)} (default: %(default)s; q8_0: about half the size, nearly "
                        "the same answers; Q4_K_M and other k-quants: llama.cpp's llama-quantize, on the f16 file)")
    p.add_argument("--output_dir", help="where the .gguf and the Modelfile go (default: MODEL_PATH-gguf)")
    p.add_argument("--install_converter", action="store_true",
                   help="only unpack llama.cpp's converter into this environment (what `make gguf-setup` runs)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    try:
        if args.install_converter:
            print(f"llama.cpp's converter: {install_converter()}")
            return 0
        export = plan_export(args.model_path, args.outtype, args.output_dir)
        print(f"converting {export.model_path} ({'chat' if export.chat else 'text'} model) to {export.gguf} ...",
              flush=True)
        seconds = run_export(export)
    except ValueError as e:  # ExportError and ModelFolderError are ValueErrors, and so is check_disk_space's
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    size = export.gguf.stat().st_size
    modelfile = export.output_dir / MODELFILE
    print(f"wrote {export.gguf} ({size / 1e6:,.1f} MB) in {seconds:.0f} s, and {modelfile}\n"
          f"  ollama:    ollama create {export.model_path.name} -f {modelfile} && ollama run {export.model_path.name}\n"
          + (f"  llama.cpp: llama-cli -m {export.gguf}\n" if export.chat else
             f"  llama.cpp: llama-completion -m {export.gguf} -p 中国的首都是 -n 64\n") +
          f"  LM Studio: lms import {export.gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
