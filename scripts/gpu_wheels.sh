#!/usr/bin/env bash
# Wheels for the lent GPU machine (Python 3.12 with its own torch 2.11, no network, no DeepSpeed): what
# launch/pretrain.py needs beyond what that machine has, into .whl/base/ (git-ignored, ~6 MB; a device call
# carries at most 64 MiB, so DALI's ~200 MB wheel travels in parts: scripts/dali_wheel.sh, into .whl/dali/).
# Then one device call runs everything:
#   run(command="bash bench/gpu_session.sh", carry=[".whl/base"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DEST=.whl/base  # beside .whl/dali/, which this leaves alone
rm -rf "$DEST" && mkdir -p "$DEST"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# DeepSpeed's own dependencies, and prometheus-client (imported by the trainer's metrics exporter).
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$DEST" prometheus-client==0.26.0 hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2 msgpack==1.2.4 \
  ninja==1.13.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# DeepSpeed ships as an sdist: build its pure-Python wheel (no ops are compiled: DS_BUILD_OPS=0).
DS_BUILD_OPS=0 "$PIP" wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
ls -la "$DEST"
du -sh "$DEST"
