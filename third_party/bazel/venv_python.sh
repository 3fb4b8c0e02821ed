#!/bin/sh
# Python interpreter for Bazel's py_* targets: the repository's virtualenv
# (.venv, made by `make venv-test`), wherever the clone lives.
#
# Bazel runs this file through a runfiles symlink that points back at the
# source tree, so resolving it gives <repo>/third_party/bazel/venv_python.sh.
# KERAS_MOBILEVITV2_PYTHON, when set, names another interpreter to use.
if [ -n "${KERAS_MOBILEVITV2_PYTHON:-}" ]; then
    exec "$KERAS_MOBILEVITV2_PYTHON" "$@"
fi
here=$(dirname "$(readlink -f "$0")")
python="$here/../../.venv/bin/python"
if [ ! -x "$python" ]; then
    echo "venv_python.sh: $python not found; run 'make venv-test' first" >&2
    exit 127
fi
exec "$python" "$@"
