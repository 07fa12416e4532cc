"""Training past one device: the strategy from the environment, sharded input, who writes
where, and stopping all workers together on SIGTERM.

A `TF_CONFIG` naming chief/worker tasks selects `tf.distribute.MultiWorkerMirroredStrategy`
(synchronous data parallelism over machines: every step all-reduces the gradients, so all
workers hold the same weights); without it `num_gpus > 1` selects `MirroredStrategy` on one
machine, and otherwise the default (one device). The tutorials' rules for a multi-worker
custom loop hold here (https://www.tensorflow.org/tutorials/distribute/multi_worker_with_ctl):
the strategy exists before any other TensorFlow op, every worker runs every step, reduce and
checkpoint save (those are collectives), the chief (task 'chief', else worker 0) writes the
real checkpoints and summaries, the others write to temporary directories they remove.

SIGTERM is handled here (`StopSignal`) rather than by TensorFlow's
`PreemptionCheckpointHandler` (failure_handling.py). Given the run's CheckpointManager, the
handler restores its step counter through that manager, so the chief (reading the run's
checkpoints) and the other workers (reading their empty temporary directories) disagree on
the step to save at. Given a bare Checkpoint, it writes its own ckpt-N files, one kept, into
the run's directory and the other workers' workertemp_<i> directories beside it. Here the
flag is all-reduced with each step's results, and every worker saves model.ckpt-STEP after
the step where some worker saw it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator

import tensorflow as tf

from capsules.errors import UsageError

# Exit status of a worker that saved a checkpoint because a worker got SIGTERM: the code
# TensorFlow's PreemptionCheckpointHandler exits with outside Google Cloud, which cluster
# managers are told to restart on.
PREEMPTED_EXIT_CODE = 42
# The jobs of a MultiWorkerMirroredStrategy cluster (no parameter servers, no evaluator).
CLUSTER_JOBS = ("chief", "worker")


class Preempted(RuntimeError):  # noqa: N818 (a stop, not a failure)
    """A worker got SIGTERM: every worker saved a checkpoint at the same step and stopped."""


class WorkerLostError(RuntimeError):
    """A peer worker stopped (killed, crashed or unreachable) during a step."""


def cluster_from_environment(environ: dict | None = None) -> dict | None:
    """The `TF_CONFIG` of `environ` (default os.environ) as a dict, or None without one.

    Raises UsageError, naming TF_CONFIG, when it is not JSON, names no chief/worker task,
    names other jobs (MultiWorkerMirroredStrategy has no parameter servers), or lacks this
    task's type and index.
    """
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"TF_CONFIG is not JSON ({error}): {text[:200]}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not any(cluster.get(job) for job in CLUSTER_JOBS):
        raise UsageError(f"TF_CONFIG: expected a 'cluster' with 'worker' (and optionally "
                         f"'chief') addresses, got {text[:200]}")
    others = sorted(set(cluster) - set(CLUSTER_JOBS))
    if others:
        raise UsageError(f"TF_CONFIG: jobs {others} are not supported; synchronous training "
                         f"(MultiWorkerMirroredStrategy) takes only {list(CLUSTER_JOBS)}")
    task = config.get("task", {})
    if task.get("type") not in CLUSTER_JOBS or not isinstance(task.get("index"), int):
        raise UsageError(f"TF_CONFIG: expected 'task': {{'type': 'worker', 'index': I}}, "
                         f"got {task}")
    if not 0 <= task["index"] < len(cluster.get(task["type"], [])):
        raise UsageError(f"TF_CONFIG: task {task} is not in the cluster {cluster}")
    return config


def strategy_from_environment(num_gpus: int = 1) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy under TF_CONFIG, MirroredStrategy for num_gpus > 1, or the
    default strategy. Call it before any other TensorFlow op (collectives are configured at
    program start-up).

    Under TF_CONFIG each worker trains on all its visible devices (CUDA_VISIBLE_DEVICES
    chooses them), so num_gpus must stay 1. Raises UsageError for a bad TF_CONFIG, for
    num_gpus > 1 with TF_CONFIG, or for more GPUs than the machine has.
    """
    if cluster_from_environment() is not None:
        if num_gpus > 1:
            raise UsageError(f"num_gpus={num_gpus} with TF_CONFIG: under TF_CONFIG every worker "
                             "trains on all its GPUs (choose them with CUDA_VISIBLE_DEVICES)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if num_gpus <= 1:
        return tf.distribute.get_strategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) < num_gpus:
        raise UsageError(f"num_gpus={num_gpus}: this machine has {len(gpus)} GPU(s)")
    return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(num_gpus)])


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's checkpoints, summaries and messages."""
    return strategy.extended.should_checkpoint


@contextlib.contextmanager
def write_dir(strategy: tf.distribute.Strategy, directory: str) -> Iterator[str]:
    """`directory` (created) on the chief; on other workers a new local temporary directory,
    removed on exit.

    Every worker must save checkpoints and write what reads distributed variables (a save
    all-reduces the metrics' on-read variables), so the others write where nobody reads.
    """
    if is_chief(strategy):
        os.makedirs(directory, exist_ok=True)
        yield directory
        return
    task_id = strategy.cluster_resolver.task_id
    temporary = tempfile.mkdtemp(prefix=f"capsules-worker{task_id}-")
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def distributed_inputs(
    strategy: tf.distribute.Strategy,
    make_dataset: Callable[[int, tuple[int, int] | None], tf.data.Dataset],
    global_batch_size: int,
) -> tf.distribute.DistributedDataset:
    """The batches of `make_dataset` split over `strategy`'s replicas, `global_batch_size` in all.

    Args:
      strategy: the strategy the model was built in.
      make_dataset: (batch size, shard) -> repeating dataset of batches; `shard` is None for a
        single worker, else (number of workers, this worker's index) and the dataset is this
        worker's share (`input_data.inputs(..., shard=...)`).
      global_batch_size: examples per step over all replicas; a multiple of their number.

    Each worker builds its pipeline once with batches of global_batch_size / workers, which
    its local replicas split in turn, so a step takes as many examples as one process would.
    """
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise UsageError(f"batch_size={global_batch_size}: expected a multiple of the "
                         f"{replicas} replicas (devices over all workers) it is split over")

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        workers = context.num_input_pipelines
        shard = None if workers == 1 else (workers, context.input_pipeline_id)
        worker_batch = global_batch_size // workers
        dataset = make_dataset(worker_batch, shard)
        replica_batch = context.get_per_replica_batch_size(global_batch_size)
        if replica_batch == worker_batch:
            return dataset
        return dataset.rebatch(replica_batch, drop_remainder=True)

    return strategy.distribute_datasets_from_function(dataset_fn)


class StopSignal:
    """While entered, SIGTERM sets `requested` instead of killing the process.

    The training loop sends the flag through its step's all-reduce, so a SIGTERM to any
    worker stops all of them after the same step. Outside the main thread (where Python
    cannot install signal handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.requested = True

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# Errors with which a step's collectives fail when a peer worker is gone: its heartbeats
# stopped (TensorFlow's coordination service notices within its 10 s heartbeat timeout) or
# its connection was reset or closed.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
               tf.errors.DeadlineExceededError)


@contextlib.contextmanager
def peer_errors_as_worker_lost(strategy: tf.distribute.Strategy, train_dir: str) -> Iterator[None]:
    """Turns the errors of a multi-worker step whose peer stopped into a WorkerLostError
    naming the cause and the checkpoint of train_dir a rerun resumes from."""
    try:
        yield
    except PEER_ERRORS as error:
        if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            raise
        lines = [line.strip() for line in error.message.splitlines() if line.strip()]
        cause = next((line for line in lines if "aborted by" in line), lines[-1] if lines else "")
        raise WorkerLostError(
            f"a worker of the cluster stopped ({type(error).__name__}: {cause[:300]}); "
            f"rerun the same command on every worker to resume from "
            f"{tf.train.latest_checkpoint(train_dir) or 'the start (no checkpoint yet)'}"
        ) from None
