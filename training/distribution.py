"""Choosing the tf.distribute strategy from `--strategy`."""

import json
import os

import tensorflow as tf


def _tf_config():
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON: {error}") from None


def make_strategy(name, tpu_address=""):
    """`auto|one_device|mirrored|multi_worker|tpu` -> a tf.distribute.Strategy.

    `tpu_address` (tpu only): a TPU name, a grpc://host:port address or
    'local'; empty lets TPUClusterResolver find it (TPU_NAME, Cloud metadata).
    """
    if tpu_address and name != "tpu":
        raise ValueError(f"--tpu {tpu_address!r} is only used with --strategy=tpu, not {name!r}.")
    # Physical devices: listing logical ones would initialise the runtime, and
    # MultiWorkerMirroredStrategy must configure collectives before that.
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        cluster = _tf_config().get("cluster", {})
        if sum(len(v) for v in cluster.values()) > 1:
            name = "multi_worker"
        elif len(gpus) > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        cpus = tf.config.list_logical_devices("CPU") if not gpus else []
        if not gpus and len(cpus) > 1:  # logical CPU devices configured by the user
            return tf.distribute.MirroredStrategy([d.name for d in cpus])
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        config = _tf_config()
        if not config.get("cluster") or "task" not in config:
            raise ValueError(
                "--strategy=multi_worker reads the cluster from the TF_CONFIG "
                'environment variable, e.g. {"cluster": {"worker": ["host1:port", '
                '"host2:port"]}, "task": {"type": "worker", "index": 0}}; it is '
                "unset or has no cluster/task."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy {name!r}.")


def is_chief(strategy):
    """True on the worker that writes checkpoints, summaries and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def worker_index(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return getattr(resolver, "task_id", 0) or 0


def _all_gather(strategy, values):
    """`values` (ints) of every replica of every worker, one row each."""
    row = tf.constant([values], tf.int64)

    @tf.function
    def gather():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_gather(row, axis=0))

    return strategy.experimental_local_results(gather())[0].numpy().tolist()


def shared_model_dir_error(views, model_dir):
    """The error when the workers' `views` of model_dir differ, else None.

    A view is (latest checkpoint step or -1, 1 if run_config.json is there).
    """
    if all(view == views[0] for view in views):
        return None
    seen = "; ".join(
        f"replica {index}: latest checkpoint {'none' if step < 0 else step}, "
        f"run configuration {'present' if config else 'absent'}"
        for index, (step, config) in enumerate(views)
    )
    return (
        f"The workers see different contents in --model_dir {model_dir} ({seen}). "
        "With --strategy=multi_worker, model_dir must be one folder on a filesystem that "
        "every worker reads and writes (e.g. GCS or NFS): every worker resumes from the "
        "chief's checkpoints, and one that cannot see them would train from scratch."
    )


def check_shared_model_dir(strategy, model_dir, look):
    """Raises on every worker at once when the workers see model_dir
    differently; `look()` returns this worker's view (as for
    `shared_model_dir_error`)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    _all_gather(strategy, [0, 0])  # a barrier: the chief has prepared model_dir
    message = shared_model_dir_error(_all_gather(strategy, look()), model_dir)
    if message:
        raise ValueError(message)


def make_deterministic():
    """Bitwise-repeatable TensorFlow on one machine, from here on.

    Concurrently running ops (inter-op parallelism) are what makes two CPU
    runs differ: with one inter-op thread, two 20-step runs gave the same
    weights, with the default they did not (single ops stay multi-threaded,
    and deterministic). TF's deterministic kernels cover GPU ops.
    """
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError as error:
        raise ValueError(
            "--deterministic must take effect before TensorFlow starts; this process already ran "
            f"TensorFlow ops with another inter-op thread count ({error})"
        ) from None
    tf.config.experimental.enable_op_determinism()
