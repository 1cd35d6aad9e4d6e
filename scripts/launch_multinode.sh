#!/usr/bin/env bash
# Launch `eaft-pl fit` on several nodes, with the process counts read from the scale overlay, so the
# launcher and the Trainer (trainer.devices x trainer.num_nodes) cannot disagree.
#
#   scripts/launch_multinode.sh torchrun RECIPE.yaml OVERLAY.yaml [extra eaft-pl args]
#       Run once on every node. Needs MASTER_ADDR (host name of node 0) and NODE_RANK (0..nodes-1);
#       MASTER_PORT defaults to 29500. torchrun starts trainer.devices processes on this node.
#   scripts/launch_multinode.sh srun RECIPE.yaml OVERLAY.yaml [extra eaft-pl args]
#       Run once, inside an allocation (sbatch / salloc --nodes=N --ntasks-per-node=G --gpus-per-node=G).
#       srun starts one process per GPU; Lightning reads ranks and the master address from SLURM.
#
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

if [[ $# -lt 3 || ( "$1" != torchrun && "$1" != srun ) ]]; then
    echo "usage: $0 torchrun|srun RECIPE.yaml OVERLAY.yaml [extra eaft-pl args]" >&2
    exit 2
fi
launcher=$1 recipe=$2 overlay=$3
shift 3
python=${PYTHON:-python}

# trainer.devices and trainer.num_nodes of the overlay (the recipe must not override them).
read_counts='
import sys, yaml
trainer = (yaml.safe_load(open(sys.argv[1])) or {}).get("trainer", {})
devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
if not isinstance(devices, int) or not isinstance(nodes, int):
    sys.exit(f"{sys.argv[1]}: set trainer.devices and trainer.num_nodes to integers, got {devices!r} and {nodes!r}")
print(devices, nodes)
'
counts=$("$python" -c "$read_counts" "$overlay")
read -r devices nodes <<< "$counts"

fit=("$python" -m eaft_pl.cli fit --config "$recipe" --config "$overlay" "$@")
case $launcher in
torchrun)
    : "${MASTER_ADDR:?set MASTER_ADDR to the host name of node 0}"
    : "${NODE_RANK:?set NODE_RANK to the rank of this node (0..$((nodes - 1)))}"
    cmd=(torchrun --nnodes "$nodes" --nproc-per-node "$devices" --node-rank "$NODE_RANK"
         --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" -m eaft_pl.cli fit
         --config "$recipe" --config "$overlay" "$@")
    ;;
srun)
    cmd=(srun --nodes "$nodes" --ntasks-per-node "$devices" --gpus-per-node "$devices" "${fit[@]}")
    ;;
esac

if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
else
    exec "${cmd[@]}"
fi
