#!/usr/bin/env bash
# Runs the test suite through Bazel, offline.
#
# Assumes the virtualenv .venv already exists in the repository root (`make
# test` / `make venv-test` creates it); py_* targets run under it through the
# toolchain in third_party/bazel. Installs Bazel 4.2.3 from Debian's archive
# when `bazel` is missing. Extra arguments go to `bazel test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v bazel >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y \
        bazel-bootstrap bazel-rules-java bazel-platforms
fi

if [ ! -x .venv/bin/python ]; then
    echo "bazel_test.sh: .venv/bin/python is missing; run 'make venv-test' first" >&2
    exit 1
fi

# Resource limits for a 2-core / 24 GB machine; .bazelrc sets the rest
# (offline repository overrides, --local_test_jobs=1, --test_output=errors).
bazel test \
    --local_cpu_resources=2 \
    --local_ram_resources=16384 \
    --jobs=2 \
    --local_test_jobs=1 \
    --test_output=errors \
    "$@" \
    //tests:test_layers //tests:test_mobilevitv2 //tests:test_convert
