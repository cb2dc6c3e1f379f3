#!/usr/bin/env bash
# Multi-node training through torchrun with a c10d rendezvous. Run the same line on every node,
# changing only NODE_RANK:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh --config configs/criteo_mmoe.toml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh --config configs/criteo_mmoe.toml
#
# Arguments go to `python -m app train` unchanged (--config FILE, --section.key value ...).
# A run resumes from RUN_DIR/checkpoints/latest when there is one (--train.resume false: fresh).
#
# Environment, with defaults:
#   CONFIG            config file used when the arguments have no --config [the app's default]
#   NNODES            number of nodes, or MIN:MAX for an elastic job [1]
#   MIN_NODES, MAX_NODES  another way to write NNODES=MIN_NODES:MAX_NODES
#   NODE_RANK         this node's rank; node 0 hosts the rendezvous store. Leave it unset for an
#                     elastic job: ranks then go by arrival and the host is found by its address
#   NPROC_PER_NODE    processes per node [the visible GPUs; 1 on a machine without GPUs]
#   MASTER_ADDR       rendezvous host, reachable from every node [127.0.0.1]
#   MASTER_PORT       rendezvous port, free on MASTER_ADDR [29500]
#   RDZV_ENDPOINT     host:port; replaces MASTER_ADDR and MASTER_PORT
#   RDZV_CONF         extra rendezvous settings, e.g. read_timeout=300 (slow node starts)
#   RUN_ID            rendezvous id, the same on every node of a job [SLURM_JOB_ID, else mmoe]
#   MAX_RESTARTS      worker-group restarts after a failure; each resumes from the latest
#                     checkpoint [0]
#   SHUTDOWN_TIMEOUT  seconds workers get to write a checkpoint after SIGTERM before SIGKILL [90]
#   AGENT_IGNORES     signals torchrun ignores, space-separated, see Signals below [USR1]
#   LOG_DIR           also write each rank's output to LOG_DIR/<run id>_*/attempt_<n>/<local rank>/
#   PYTHON            interpreter [this repo's .venv/bin/python]
#
# NCCL (GPU runs; these are read by NCCL itself, set them in the environment to change them):
#   NCCL_SOCKET_IFNAME  interface(s) for bootstrap and socket traffic, e.g. ib0 or ^lo,docker
#                       (GLOO_SOCKET_IFNAME is the same for gloo: CPU runs, and the
#                       per-batch input counts the trainer exchanges between hosts)
#   NCCL_IB_DISABLE     1: no InfiniBand/RoCE, use TCP sockets (clusters without working IB)
#   NCCL_IB_HCA         which IB adapters to use, e.g. mlx5_0,mlx5_1
#   NCCL_DEBUG          WARN (the default here), INFO to see the rings, transports and interfaces
#   NCCL_NVLS_ENABLE    0 turns off NVLink SHARP (multicast) collectives, for hosts or containers
#                       where multicast is unsupported or must stay off
#   NCCL_P2P_DISABLE    1 turns off direct GPU-to-GPU copies (broken PCIe peer-to-peer)
#
# Signals: the ranks write a checkpoint and exit 0 on SIGUSR1 or SIGTERM. torchrun passes SIGTERM
# and SIGINT on to them (and then exits non-zero). AGENT_IGNORES lists the signals torchrun
# itself ignores, because the scheduler delivers them to every process of the job, ranks
# included (Slurm does): torchrun then exits 0 once the ranks have stopped [USR1].
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$repo/.venv/bin/python}

visible_gpus() {
  if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
    # Slurm and containers narrow the GPUs through this list; "" or NoDevFiles means none
    local ids
    IFS=, read -ra ids <<< "${CUDA_VISIBLE_DEVICES//NoDevFiles/}"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}

if [[ -n ${MIN_NODES:-} && -n ${MAX_NODES:-} ]]; then
  NNODES=$MIN_NODES:$MAX_NODES
fi
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(visible_gpus)}
((NPROC_PER_NODE > 0)) || NPROC_PER_NODE=1
RDZV_ENDPOINT=${RDZV_ENDPOINT:-${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}}
RUN_ID=${RUN_ID:-${SLURM_JOB_ID:-mmoe}}
MAX_RESTARTS=${MAX_RESTARTS:-0}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-90}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1  # rank output reaches the logs as it is written, not at exit

rdzv_conf=${RDZV_CONF:-}
if [[ -n ${NODE_RANK:-} ]]; then
  # said outright, not guessed from host names (which miss aliases and secondary interfaces)
  rdzv_conf="is_host=$((NODE_RANK == 0 ? 1 : 0))${rdzv_conf:+,$rdzv_conf}"
fi

log_args=()
if [[ -n ${LOG_DIR:-} ]]; then
  # --tee keeps the output on the console as well, each line prefixed with its global rank
  log_args=(--log-dir "$LOG_DIR" --redirects 3 --tee 3)
  export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[rank${rank}]:'
fi

nccl=$(env | grep -E '^(NCCL|GLOO)_' | sort | tr '\n' ' ' || true)
echo "torchrun.sh: ${HOSTNAME%%.*} node ${NODE_RANK:-?} of $NNODES, $NPROC_PER_NODE processes," \
     "rendezvous $RDZV_ENDPOINT id $RUN_ID; $nccl" >&2

AGENT_IGNORES=${AGENT_IGNORES-USR1}
forwarded=()  # torchrun's default list less the ignored ones: torchrun passes these to the ranks
for sig in TERM INT HUP QUIT; do
  [[ " $AGENT_IGNORES " == *" $sig "* ]] || forwarded+=("SIG$sig")
done
for sig in $AGENT_IGNORES; do
  trap '' "$sig"  # stays ignored through exec; the ranks install their own handlers
done

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$RDZV_ENDPOINT" \
  --rdzv-id "$RUN_ID" \
  ${rdzv_conf:+--rdzv-conf "$rdzv_conf"} \
  --max-restarts "$MAX_RESTARTS" \
  --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
  --signals-to-handle "$(IFS=,; echo "${forwarded[*]}")" \
  "${log_args[@]}" \
  -m app train ${CONFIG:+--config "$CONFIG"} "$@"
