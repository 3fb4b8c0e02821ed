"""One py_test per pytest file, run through pytest_main.py with pytest.ini."""

def pytest_test(name, size, deps, srcs = [], data = []):
    """`name`.py as a py_test: pytest_main.py calls pytest on it with the
    repo's pytest.ini (markers, -m "not slow"); `srcs` and `data` are extra
    modules and files the test reads."""
    native.py_test(
        name = name,
        size = size,
        srcs = [name + ".py", "//third_party/bazel:pytest_main.py"] + srcs,
        args = ["$(location %s.py)" % name],
        data = ["//:pytest_ini"] + data,
        main = "//third_party/bazel:pytest_main.py",
        python_version = "PY3",
        deps = deps,
    )
