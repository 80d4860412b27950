#!/usr/bin/env bash
# Run a training script (pretrain.py, finetune.py) under the DeepSpeed launcher on every GPU of this machine, on
# the nodes of a hostfile, or on CPU ranks: `bash launch.sh SCRIPT.py ARGS...`. pretrain.sh and finetune.sh call it.
#   NUM_GPUS     ranks on this machine (default: every GPU of CUDA_VISIBLE_DEVICES, else of the machine; or 1 CPU rank)
#   CUDA_VISIBLE_DEVICES  the GPUs of this machine to train on (e.g. 2,3 on a shared server): honoured, and named
#   DEVICE=cpu   CPU ranks even where there are GPUs (demo.sh)
#   HOSTFILE     DeepSpeed hostfile for several nodes ("node1 slots=8" lines): started from the first node over ssh
#   NODE_RANK    with HOSTFILE, no ssh: run this on every node, each with its place in the hostfile (0, 1, ...)
#   MASTER_ADDR  with NODE_RANK: the first node's address, which every node reaches
#   MASTER_PORT  rendezvous port (default: a free one on a single node; 29500 with a hostfile)
set -euo pipefail
cd "$(dirname "$0")"

# A token among the arguments would be printed by the launcher and visible in `ps` for the whole run, here and on
# every node: huggingface_hub reads it from the environment instead, and this script starts again without it.
ARGS=()
for ((i = 1; i <= $#; i++)); do
    case ${!i} in
        --hub_token) ((i++)); export HF_TOKEN=${!i} ;;
        --hub_token=*) export HF_TOKEN=${!i#*=} ;;
        *) ARGS+=("${!i}") ;;
    esac
done
if (( ${#ARGS[@]} < $# )); then
    exec bash "$PWD/$(basename "$0")" "${ARGS[@]}"
fi

if [[ -n ${HOSTFILE:-} ]]; then
    MASTER_PORT=${MASTER_PORT:-29500}  # every node must agree on it
elif [[ -z ${MASTER_PORT:-} ]]; then
    # One node: any free port, so that two jobs on one machine never collide on a default.
    MASTER_PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
elif ! python -c 'import socket as s, sys; t = s.socket(); t.setsockopt(s.SOL_SOCKET, s.SO_REUSEADDR, 1)
t.bind(("", int(sys.argv[1]))); t.listen()' "$MASTER_PORT" 2>/dev/null; then
    echo "error: MASTER_PORT=$MASTER_PORT is in use (another job?): set another MASTER_PORT, or leave it unset to take a free one" >&2
    exit 2
fi

# DeepSpeed compiles its ops on first use into TORCH_EXTENSIONS_DIR (default: one folder in ~/.cache for every
# Python environment, so two environments rebuild each other's ops, and wait on each other's build lock): keep them
# with the environment that built them.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(python -c 'import sys; print(sys.prefix)')/torch_extensions}

if [[ ${DEVICE:-} != cpu ]] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    # The GPUs the user chose: DeepSpeed's runner honours CUDA_VISIBLE_DEVICES only when no --num_gpus is given (it
    # deletes it otherwise, and the job lands on every card of a shared server, counted from GPU 0). So NUM_GPUS counts
    # within it, and the runner gets the list back (it turns it into --include localhost:LIST) instead of a count.
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && -z ${HOSTFILE:-} ]]; then
        IFS=, read -ra VISIBLE <<< "$CUDA_VISIBLE_DEVICES"
        for gpu in "${VISIBLE[@]}"; do
            if ! [[ $gpu =~ ^[0-9]+$ ]]; then
                echo "error: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: DeepSpeed's launcher takes GPU indices only" \
                     "(as \`nvidia-smi -L\` numbers them, e.g. CUDA_VISIBLE_DEVICES=2,3)" >&2
                exit 2
            fi
        done
        NUM_GPUS=${NUM_GPUS:-${#VISIBLE[@]}}
        if ! [[ $NUM_GPUS =~ ^[1-9][0-9]*$ ]] || (( NUM_GPUS > ${#VISIBLE[@]} )); then
            echo "error: NUM_GPUS=$NUM_GPUS but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES names ${#VISIBLE[@]} GPU(s):" \
                 "NUM_GPUS counts within it; set it to at most ${#VISIBLE[@]}, or leave it unset" >&2
            exit 2
        fi
        export CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${VISIBLE[*]:0:NUM_GPUS}")
    else
        NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
    fi
    # Which physical cards, by name, so that a shared server's other users can be told (and the log shows a mistake).
    [[ -n ${HOSTFILE:-} ]] || nvidia-smi -L | awk -v list="${CUDA_VISIBLE_DEVICES:-}" -v n="$NUM_GPUS" '
        BEGIN { k = split(list, wanted, ","); for (i = 1; i <= k; i++) chosen[wanted[i]] = 1 }
        { id = $2; sub(":", "", id) }
        (k ? id in chosen : id + 0 < n) { sub(/ \(UUID.*/, ""); print "training on " $0 }'
    # Precision, like the batch shape, is chosen by the training script from the card (seqlm/training/fit.py): bf16 is not
    # on every GPU.
    DEVICE_ARGS=()
else
    # CPU ranks: gloo backend, fp32; the launcher leaves OMP_NUM_THREADS unset, so share the cores out here.
    NUM_GPUS=${NUM_GPUS:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NUM_GPUS > 0 ? $(nproc) / NUM_GPUS : 1 ))}
    # Every step allocates and frees logits of block x 151,936 floats; by default glibc hands such blocks back to
    # the kernel each time, and re-faulting their pages costs more than the math (measured 2.5x per step for the
    # tiny preset). For the 0.5B preset on CPU it costs memory instead (peak 16.1 vs 12.2 GB): set both to 131072.
    export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
    DEVICE_ARGS=(--use_cpu true)
    export DS_ACCELERATOR=cpu  # DeepSpeed would take CUDA wherever torch sees a GPU
    # DeepSpeed's CPU all-reduce leaves a 69 MB shared-memory buffer per rank and port in /dev/shm, which is RAM:
    # dozens of runs filled 11 GB of a 24 GB machine. When this run ends (cleanup), remove the buffers of its port
    # that no running process still maps (another job's stay).
    SHM_BUFFERS="/dev/shm/deepspeed_allreduce_buffer_$(id -u)_*_${MASTER_PORT}_*"
fi

# The launcher stops every rank as soon as one dies, before the others could say why, in a line that ends with the dead
# rank's exit code (its command is that of the node's last rank, whichever rank died: DeepSpeed 0.19). Ranks that lose
# a peer wait for it (seqlm.training.run.wait_for_the_launcher), so the code is the dead rank's. Repeat it at the end,
# in one line, with what to do.
LAUNCH_LOG=$(mktemp)
cleanup() {
    { set +x; } 2>/dev/null
    rm -f "$LAUNCH_LOG" "${RUN_ENV:-}" "${LOCAL_SECRETS:-}"
    if [[ -n ${SECRETS_FILE:-} ]]; then
        for host in "${HOSTS[@]}"; do
            # shellcheck disable=SC2086
            ssh -n -o BatchMode=yes ${PDSH_SSH_ARGS_APPEND:-} "$host" rm -f "$SECRETS_FILE" || true
        done
    fi
    for f in ${SHM_BUFFERS:-}; do
        [[ -e $f ]] && ! grep -qsF "$f" /proc/[0-9]*/maps && rm -f "$f"
    done
    true
}
trap cleanup EXIT  # however this script ends

# DeepSpeed starts the other nodes over pdsh/ssh with only the variables it knows (PYTHON*, and NCCL_* on GPUs) and
# those a .deepspeed_env file names, and it writes them into the ssh command line, which `ps` shows to every user of
# both machines. The settings a run needs go that way, in a file of that format given as DS_ENV_FILE (the user's own
# .deepspeed_env first); secrets (tokens, keys) never: they go over ssh's standard input into a file only the user
# can read on every node (SEQLM_SECRETS_FILE, which the ranks read: seqlm.training.run), removed when the run ends.
FORWARDED='^(HF_|HUGGING_FACE_|SWANLAB_|TRANSFORMERS_|TOKENIZERS_|TORCH_|PYTORCH_|OMP_|MALLOC_|NCCL_)'
SECRET='(TOKEN|KEY|SECRET|PASSWORD)'
forward_environment() {
    mapfile -t HOSTS < <(sed 's/#.*//' "$HOSTFILE" | awk 'NF { print $1 }')
    RUN_ENV=$(mktemp) LOCAL_SECRETS=$(mktemp)  # mode 600
    for dir in ~ .; do
        [[ -f $dir/${DS_ENV_FILE:-.deepspeed_env} ]] && sed -e '$a\' "$dir/${DS_ENV_FILE:-.deepspeed_env}" >> "$RUN_ENV"
    done
    local name
    for name in $(compgen -e | grep -E "$FORWARDED"); do
        [[ ${!name} == *$'\n'* ]] && continue  # one line a variable, in DeepSpeed's format
        if [[ $name =~ $SECRET ]]; then
            printf '%s=%s\n' "$name" "${!name}" >> "$LOCAL_SECRETS"
        else
            printf '%s=%s\n' "$name" "${!name}" >> "$RUN_ENV"
        fi
    done
    if [[ -s $LOCAL_SECRETS ]]; then
        SECRETS_FILE=.cache/seqlm/secrets-$(hostname)-$$.env  # in the home folder of each node
        local host
        for host in "${HOSTS[@]}"; do
            # shellcheck disable=SC2086  # PDSH_SSH_ARGS_APPEND holds several options, as pdsh splits them
            ssh -o BatchMode=yes ${PDSH_SSH_ARGS_APPEND:-} "$host" \
                "umask 077 && mkdir -p .cache/seqlm && cat > $SECRETS_FILE" < "$LOCAL_SECRETS" || {
                echo "error: cannot reach $host over ssh (from $HOSTFILE) to give it the run's tokens: set up" \
                     "passwordless ssh to every node of the hostfile" >&2
                exit 2
            }
        done
        echo "SEQLM_SECRETS_FILE=~/$SECRETS_FILE" >> "$RUN_ENV"
    fi
    export DS_ENV_FILE=$RUN_ENV
}

if [[ -n ${HOSTFILE:-} && -n ${NODE_RANK:-} ]]; then
    LAUNCHER=(deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK"
              --master_addr "${MASTER_ADDR:?with NODE_RANK, set MASTER_ADDR to the address of the first node}"
              --master_port "$MASTER_PORT")
elif [[ -n ${HOSTFILE:-} ]]; then
    LAUNCHER=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"})
    forward_environment
elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${#DEVICE_ARGS[@]} == 0 ]]; then
    LAUNCHER=(deepspeed --master_port "$MASTER_PORT")  # the runner reads the GPUs from CUDA_VISIBLE_DEVICES
else
    LAUNCHER=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
fi

set +e -x
"${LAUNCHER[@]}" "$1" "${DEVICE_ARGS[@]}" "${@:2}" 2>&1 | tee "$LAUNCH_LOG"  # device flags first: the caller's win
{ code=${PIPESTATUS[0]}; set +x -e; } 2>/dev/null
died=$(grep -o -m 1 -- "--local_rank=[0-9]*'.* exits with return code = -\?[0-9]*" "$LAUNCH_LOG" || true)
if (( code != 0 )) && [[ -n $died ]]; then
    died_code=${died##* = }
    why=$([[ $died_code == -9 ]] && echo "killed: out of memory, or kill -9" || echo "see its lines above")
    resume=$(python -m seqlm.training.checkpoints "$@" 2>/dev/null) || resume="the newest complete checkpoint"
    echo "error: a rank on $(hostname) died (exit code $died_code, $why) and the launcher stopped the others:" \
         "rerunning the same command resumes from $resume" >&2
fi
exit "$code"
