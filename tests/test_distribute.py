"""Training past one device (capsules/distribute.py, capsules/local_cluster.py, experiment.py):
TF_CONFIG, the input's sharding, the loopback launcher, and in subprocesses on CPU and
loopback: 2 workers against 1 process, SIGTERM (also to one process) and SIGKILL to a
worker, MirroredStrategy over 2 logical CPU devices.

The training runs use the tiny records and small model of test_experiment.py; each worker is
a process of its own, so a run costs a few seconds of TensorFlow start-up per worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import input_data
from capsules import distribute, local_cluster
from capsules.errors import UsageError
from input_data.mnist import mnist_shift
from input_data.mnist.record_names import record_name

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
TIMEOUT = 600  # per command; a few seconds per worker on an idle machine
# A peer's death stops the others within TensorFlow's 10 s heartbeat timeout (docs/distributed.md);
# the bound leaves room for a loaded machine.
LOST_PEER_BOUND_SECS = 60
SMALL = "num_prime_capsules=1,routing=1"
ITERATIONS = "model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
# (After the chief's progress bar, which ends in no newline.)
PREEMPTED = re.compile(r"experiment\.py: a worker got SIGTERM: stopped after step (\d+), "
                       r"checkpoint (\S+) saved; rerun the same command to resume$", re.M)


# ---- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """8 single-digit training records in one file, 16 MultiMNIST pairs in 2 shards."""
    data_dir = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    pixels = np.zeros((8, 28, 28), np.uint8)
    pixels[:, 4:-4, 4:-4] = rng.integers(0, 256, (8, 20, 20))
    labels = np.arange(8) % 10
    mnist_shift.write_single(pixels, labels,
                             str(data_dir / record_name("train", 2)), 0, 0)
    prefix = data_dir / record_name("train", 4, multi_targets=True)
    shards = mnist_shift.write_multi(pixels, labels, str(prefix), shift=4, pad=4, num_pairs=2,
                                     max_shard=8, seed=0)
    assert len(shards) == 2
    return {"dir": str(data_dir), "multi": f"{prefix}@2"}


def train_args(data: dict, summary_dir: Path, *more: str) -> list[str]:
    return [f"--data_dir={data['dir']}", f"--summary_dir={summary_dir}", "--batch_size=4",
            "--seed=1", f"--hparams_override={SMALL},remake=false", *more]


def experiment(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python experiment.py ARGS`, finished; stdout and stderr together in .stdout."""
    return subprocess.run([sys.executable, "experiment.py", *args], cwd=ROOT, env=env or ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT)


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-5000:]
    return result


def start_workers(args: list[str], tmp_path: Path, count: int = 2) -> list[subprocess.Popen]:
    """`count` experiment.py workers of a loopback cluster, started here (to signal them);
    their temporary directories go to tmp_path/tmp, their output to tmp_path/worker-I.log."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    configs = local_cluster.tf_configs(local_cluster.free_ports(count))
    workers = []
    for index, tf_config in enumerate(configs):
        env = local_cluster.worker_environment(tf_config, dict(ENV, TMPDIR=str(tmp_path / "tmp")))
        with open(tmp_path / f"worker-{index}.log", "w") as log:
            workers.append(subprocess.Popen([sys.executable, "experiment.py", *args], cwd=ROOT,
                                            env=env, stdout=log, stderr=subprocess.STDOUT))
    return workers


def wait_for(condition, workers: list[subprocess.Popen], tmp_path: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        failed = [w for w in workers if w.poll() is not None]
        assert not failed and time.monotonic() < deadline, logs(tmp_path)
        time.sleep(0.1)


def logs(tmp_path: Path) -> str:
    return "\n".join(path.read_text()[-3000:] for path in sorted(tmp_path.glob("worker-*.log")))


def stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
        worker.wait()


def checkpoint_steps(train_dir: Path) -> list[int]:
    """The steps of the checkpoints the `checkpoint` file lists, each checked readable."""
    state = tf.train.get_checkpoint_state(str(train_dir))
    steps = []
    for path in state.all_model_checkpoint_paths if state else []:
        steps.append(int(path.rsplit("-", 1)[1]))
        assert tf.train.load_checkpoint(path).get_tensor(ITERATIONS) == steps[-1], path
    return steps


def summary_steps(train_dir: Path) -> list[list[int]]:
    """For each event file (in name order), the steps of its 'loss' scalars."""
    out = []
    for path in sorted(train_dir.glob("events.out.tfevents.*")):
        steps = []
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            steps += [event.step for value in event.summary.value if value.tag == "loss"]
        out.append(sorted(steps))
    return out


def weights(checkpoint: str) -> dict[str, np.ndarray]:
    """The model's variables in a checkpoint (the optimizer's slots aside)."""
    reader = tf.train.load_checkpoint(checkpoint)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith("model/") and "optimizer" not in name}


# ---- TF_CONFIG, sharding and the launcher (fast) --------------------------------------------

@pytest.mark.parametrize("tf_config, expected", [
    ("{", "TF_CONFIG is not JSON"),
    ('{"task": {"type": "worker", "index": 0}}', "expected a 'cluster' with 'worker'"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}',
     "jobs ['ps'] are not supported"),
    ('{"cluster": {"worker": ["a:1"]}}', "expected 'task'"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}',
     "is not in the cluster"),
])
def test_a_bad_tf_config_is_one_error_naming_it(tf_config, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        distribute.cluster_from_environment({"TF_CONFIG": tf_config})


def test_num_gpus_with_tf_config_and_an_uneven_batch_are_usage_errors(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", local_cluster.tf_configs([1234])[0])
    with pytest.raises(UsageError, match=r"^num_gpus=2 with TF_CONFIG: .*CUDA_VISIBLE_DEVICES"):
        distribute.strategy_from_environment(2)
    three_replicas = types.SimpleNamespace(num_replicas_in_sync=3)
    with pytest.raises(UsageError, match=r"^batch_size=4: expected a multiple of the 3 replicas"):
        distribute.distributed_inputs(three_replicas, lambda batch_size, shard: None, 4)


def test_tf_configs_name_every_worker_and_each_task_once():
    ports = local_cluster.free_ports(3)
    assert len(set(ports)) == 3
    configs = [json.loads(text) for text in local_cluster.tf_configs(ports)]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    for config in configs:
        assert config["cluster"] == {"worker": [f"localhost:{port}" for port in ports]}
        assert distribute.cluster_from_environment({"TF_CONFIG": json.dumps(config)}) == config
    assert distribute.cluster_from_environment({}) is None


def test_worker_environment_keeps_loopback_away_from_proxies():
    env = local_cluster.worker_environment(
        "{}", {"http_proxy": "http://proxy:3128", "HTTPS_PROXY": "x", "no_proxy": "corp", "A": "1"})
    assert not set(local_cluster.PROXY_VARIABLES) & set(env)
    assert env["no_proxy"] == "corp,localhost,127.0.0.1"
    assert env["NO_PROXY"] == "localhost,127.0.0.1"
    assert (env["TF_CONFIG"], env["A"]) == ("{}", "1")


def _images(batch) -> np.ndarray:
    return batch["images"].numpy()


@pytest.mark.slow
def test_sharding_by_data_splits_each_batch_of_one_process(data):
    """One file, two workers: the workers' batches of a step make one process's batch."""
    def batches(batch_size, shard=None, count=5):
        dataset = input_data.inputs("mnist", "train", data["dir"], batch_size, repeat=True,
                                    seed=3, shard=shard)
        return [_images(batch) for batch in dataset.take(count)]

    single = batches(4)
    worker0, worker1 = batches(2, (2, 0)), batches(2, (2, 1))
    for step in range(5):
        np.testing.assert_array_equal(np.concatenate([worker0[step], worker1[step]]),
                                      single[step])
    assert not np.array_equal(worker0[0], worker1[0])


@pytest.mark.slow
def test_seeded_sharding_of_several_files_splits_each_batch_of_one_process(data):
    """Two MultiMNIST shards, two workers, a seed: as one process, however many files."""
    def batches(batch_size, shard=None, count=6):
        dataset = input_data.inputs("mnist", "train", data["multi"], batch_size, num_targets=2,
                                    repeat=True, seed=3, shard=shard)
        return [_images(batch) for batch in dataset.take(count)]

    single = batches(4)
    worker0, worker1 = batches(2, (2, 0)), batches(2, (2, 1))
    for step in range(6):
        np.testing.assert_array_equal(np.concatenate([worker0[step], worker1[step]]),
                                      single[step])


@pytest.mark.slow
def test_sharding_by_file_gives_each_worker_its_own_files(data):
    """Two MultiMNIST shards, two workers, no seed: each reads one file; together they read
    all."""
    def epoch(shard=None):
        dataset = input_data.inputs("mnist", "train", data["multi"], 4, num_targets=2,
                                    shard=shard)
        return sorted(image.tobytes() for batch in dataset for image in _images(batch))

    everything, first, second = epoch(), epoch((2, 0)), epoch((2, 1))
    assert len(everything) == 16 and len(first) == len(second) == 8
    assert sorted(first + second) == everything
    assert not set(first) & set(second)
    with pytest.raises(ValueError, match=r"shard=\(2, 2\)"):
        input_data.inputs("mnist", "train", data["dir"], 4, shard=(2, 2))


@pytest.mark.slow
def test_local_workers_prefix_output_fail_and_stop_the_others(tmp_path):
    """Worker 1 fails at once; worker 0 would run for ever and is killed after the grace."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""\
        import json, os, sys, time
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        print(f"task {index} of {len(json.loads(os.environ['TF_CONFIG'])['cluster']['worker'])}")
        print("progress\\rdone", flush=True)
        if index == 1:
            sys.exit(3)
        time.sleep(600)
        """))
    out = tmp_path / "out.txt"
    start = time.monotonic()
    with open(out, "w") as handle:
        status = local_cluster.run_workers([sys.executable, str(script)], 2, out=handle,
                                           grace_secs=1)
    assert time.monotonic() - start < 60
    assert status == 3
    lines = out.read_text().splitlines()
    for index in (0, 1):
        assert f"[worker {index}] task {index} of 2" in lines
        assert lines.count(f"[worker {index}] progress") == 1
        assert lines.count(f"[worker {index}] done") == 1
    assert lines[-1].startswith("[local_workers] killed the workers still running")


@pytest.mark.slow
def test_local_workers_are_for_training_only():
    result = experiment("--local_workers=2", "--train=false")
    assert result.returncode == 1
    assert "--local_workers is for training" in result.stdout and "Traceback" not in result.stdout


# ---- training in several processes (slow) ----------------------------------------------------

@pytest.mark.slow
def test_two_workers_train_as_one_process_and_only_the_chief_writes(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    checked(experiment(*train_args(data, one, "--max_steps=1", "--save_step=1")))
    shutil.copytree(one, two)  # the same initial weights and optimizer state
    (tmp_path / "tmp").mkdir()
    checked(experiment(*train_args(data, one, "--max_steps=4", "--save_step=2")))
    result = checked(experiment(*train_args(data, two, "--max_steps=4", "--save_step=2",
                                            "--local_workers=2"),
                                env=dict(ENV, TMPDIR=str(tmp_path / "tmp"))))

    for index in (0, 1):
        assert f"[worker {index}] total_params:" in result.stdout
    expected = weights(str(one / "train/model.ckpt-4"))
    got = weights(str(two / "train/model.ckpt-4"))
    assert expected.keys() == got.keys() and len(expected) > 4
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5, err_msg=name)
    assert checkpoint_steps(two / "train") == checkpoint_steps(one / "train") == [1, 2, 4]
    # The chief's files only: what one process writes, one new event file with steps 2..4.
    names = {path.relative_to(two).parts[:-1] + (re.sub(r"events\..*", "events", path.name),)
             for path in two.rglob("*")}
    assert names == {path.relative_to(one).parts[:-1] + (re.sub(r"events\..*", "events",
                                                                path.name),)
                     for path in one.rglob("*")}
    assert summary_steps(two / "train") == summary_steps(one / "train") == [[1], [2, 3, 4]]
    assert not list((tmp_path / "tmp").iterdir())  # the worker's temporary directory is gone


@pytest.mark.slow
def test_sigterm_to_one_worker_saves_on_all_and_the_rerun_resumes(data, tmp_path):
    summary_dir = tmp_path / "run"
    train_dir = summary_dir / "train"
    args = train_args(data, summary_dir, "--save_step=3")
    workers = start_workers([*args, "--max_steps=100000"], tmp_path)
    try:
        wait_for(lambda: checkpoint_steps(train_dir), workers, tmp_path)  # step 3 saved
        workers[1].send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=TIMEOUT)
    finally:
        stop(workers)
    assert [w.returncode for w in workers] == [distribute.PREEMPTED_EXIT_CODE] * 2, logs(tmp_path)
    found = PREEMPTED.findall((tmp_path / "worker-0.log").read_text())
    assert len(found) == 1, logs(tmp_path)
    step = int(found[0][0])
    assert step > 3 and found[0][1] == str(train_dir / f"model.ckpt-{step}")
    assert checkpoint_steps(train_dir)[-1] == step  # saved at the step both stopped after
    assert PREEMPTED.search((tmp_path / "worker-1.log").read_text())
    assert not list((tmp_path / "tmp").iterdir())

    checked(experiment(*args, f"--max_steps={step + 1}", "--local_workers=2"))
    assert checkpoint_steps(train_dir)[-2:] == [step, step + 1]
    assert summary_steps(train_dir)[-1] == [step + 1]  # resumed after the step


@pytest.mark.slow
def test_sigterm_to_a_single_process_saves_and_exits_42(data, tmp_path):
    train_dir = tmp_path / "run" / "train"
    with open(tmp_path / "worker-0.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "experiment.py", *train_args(data, tmp_path / "run", "--save_step=2"),
             "--max_steps=100000"], cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: checkpoint_steps(train_dir), [process], tmp_path)  # step 2 saved
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=TIMEOUT)
    finally:
        stop([process])
    assert process.returncode == distribute.PREEMPTED_EXIT_CODE, logs(tmp_path)
    (found,) = PREEMPTED.findall((tmp_path / "worker-0.log").read_text())
    assert checkpoint_steps(train_dir)[-1] == int(found[0]) > 2


@pytest.mark.slow
def test_sigkill_of_a_worker_stops_the_other_with_one_error_line_and_a_rerun_resumes(
        data, tmp_path):
    summary_dir = tmp_path / "run"
    args = train_args(data, summary_dir, "--save_step=1")
    workers = start_workers([*args, "--max_steps=100000"], tmp_path)
    try:
        wait_for(lambda: checkpoint_steps(summary_dir / "train"), workers, tmp_path)
        workers[1].kill()
        killed = time.monotonic()
        workers[0].wait(timeout=LOST_PEER_BOUND_SECS)
        waited = time.monotonic() - killed
    finally:
        stop(workers)
    log = (tmp_path / "worker-0.log").read_text()
    assert workers[0].returncode == 1, log[-3000:]
    assert waited < LOST_PEER_BOUND_SECS
    errors = re.findall(r"experiment\.py: error: .*", log)
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    last = checkpoint_steps(summary_dir / "train")[-1]
    assert re.fullmatch(r"experiment\.py: error: a worker of the cluster stopped \(\w+: .+\); "
                        r"rerun the same command on every worker to resume from (\S+)",
                        errors[0]).group(1) == str(summary_dir / "train" / f"model.ckpt-{last}")

    checked(experiment(*args, f"--max_steps={last + 1}", "--local_workers=2"))
    assert checkpoint_steps(summary_dir / "train")[-2:] == [last, last + 1]
    assert summary_steps(summary_dir / "train")[-1] == [last + 1]


MIRRORED_SCRIPT = """
import sys
import tensorflow as tf

# Two logical CPU devices, configured before TensorFlow initialises.
(cpu,) = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import numpy as np

import input_data
from capsules import distribute, training
from capsules.hparams import default_hparams, parse_overrides
from capsules.models import build_model

data_dir, out_dir, small = sys.argv[1:]
hparams = parse_overrides(default_hparams(), small)
info = input_data.dataset_info("mnist", 1, False)

def make_dataset(batch_size, shard):
    return input_data.inputs("mnist", "train", data_dir, batch_size, repeat=True, seed=1,
                             shard=shard)

results = []
for name, strategy in [("one", tf.distribute.get_strategy()),
                       ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]:
    with strategy.scope():
        model = build_model("capsule", hparams, info)
        model.compile()
    if results:
        model.set_weights(results[0][1])
    initial = [w.copy() for w in model.get_weights()]
    training.train(model, distribute.distributed_inputs(strategy, make_dataset, 4),
                   f"{out_dir}/{name}", 3, 3, 4, strategy=strategy, verbose=False)
    results.append((strategy.num_replicas_in_sync, initial, model.get_weights()))
(replicas_one, start, expected), (replicas_two, _, got) = results
assert (replicas_one, replicas_two) == (1, 2), (replicas_one, replicas_two)
moved = max(float(np.max(np.abs(a - b))) for a, b in zip(expected, start))
difference = max(float(np.max(np.abs(a - b))) for a, b in zip(expected, got))
print(f"moved {moved:.3g} difference {difference:.3g}")
"""


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus_trains_as_one_device(data, tmp_path):
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, data["dir"], str(tmp_path),
                             f"{SMALL},remake=false"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    moved, difference = map(float, re.search(r"^moved (\S+) difference (\S+)$", result.stdout,
                                             re.M).groups())
    assert moved > 1e-4  # the 3 steps changed the weights
    assert difference <= 1e-5
