"""Runs one pytest file as a Bazel py_test.

Usage (from a py_test's args): pytest_main.py <workspace-relative test file>
[pytest options]. The test file, tests/conftest.py and pytest.ini are found in
the runfiles tree; pytest.ini supplies the markers and addopts (-m "not slow").
Arguments that start with "-" go to pytest unchanged, e.g.
`bazel test //tests:test_layers --test_arg=-v --test_arg=-k --test_arg=name`.
"""

import os
import sys


def _runfiles_root():
    """The workspace directory inside the runfiles tree."""
    if os.environ.get("TEST_SRCDIR") and os.environ.get("TEST_WORKSPACE"):
        return os.path.join(os.environ["TEST_SRCDIR"], os.environ["TEST_WORKSPACE"])
    # <runfiles>/<workspace>/third_party/bazel/pytest_main.py (not resolved:
    # the real file lives in the source tree, without the other runfiles).
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
    import pytest

    root = _runfiles_root()
    tests, options = [], []
    for arg in argv:
        if arg.startswith("-") or (options and options[-1] in ("-k", "-m")):
            options.append(arg)
        else:
            tests.append(os.path.join(root, arg))
    tests = tests or [os.path.join(root, "tests")]
    args = ["-q", "-p", "no:cacheprovider", "-c", os.path.join(root, "pytest.ini"), "--rootdir", root]
    # Bazel's XML output location, so results show up per test case.
    if os.environ.get("XML_OUTPUT_FILE"):
        args += ["--junitxml", os.environ["XML_OUTPUT_FILE"]]
    return pytest.main(tests + args + options)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
