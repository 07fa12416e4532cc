"""Train, validate and test capsule models: the reference's experiment.py on TensorFlow 2.

Examples:
  python experiment.py --data_dir=data/mnist --summary_dir=runs/mnist --max_steps=30000
  python experiment.py --data_dir=data/mnist --train=false \
      --checkpoint=checkpoints/mnist/model.ckpt-N
  python experiment.py --data_dir=DIR --train=false --num_trials=7 --dataset=cifar10 \
      --checkpoint=DIR/cifar{}/model.ckpt-600000 \
      --hparams_override=num_prime_capsules=64,padding=SAME,leaky=true,remake=false

The flags are read once into a `Config`; `run(config)` (or run_training, run_evaluation,
run_ensemble) does the work, so that a program or a test can call it without a command
line: `run(parse_config(["--data_dir=data/mnist", "--max_steps=10", ...]))`.
"""

from __future__ import annotations

# ruff: noqa: E402 - the command quiets TensorFlow's C++ logs before the imports below load it
from capsules.tf_logs import quiet_tensorflow_logs

# On import, not under __main__: the capsules-experiment console script imports this module.
quiet_tensorflow_logs()

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator, Sequence

from absl import app, flags

from capsules.errors import UsageError

FLAGS = flags.FLAGS


def define_flags(values: flags.FlagValues = FLAGS) -> None:
    """The reference's flags (same names, defaults and meanings) and a few additions."""
    def string(name, default, help_text, **kwargs):
        flags.DEFINE_string(name, default, help_text, flag_values=values, **kwargs)

    def integer(name, default, help_text, **kwargs):
        flags.DEFINE_integer(name, default, help_text, flag_values=values, **kwargs)

    def boolean(name, default, help_text):
        flags.DEFINE_bool(name, default, help_text, flag_values=values)

    def enum(name, default, choices, help_text):
        flags.DEFINE_enum(name, default, choices, help_text, flag_values=values)

    string("data_dir", None, "The data directory (MultiMNIST records: PREFIX@N; "
           "--dataset=multimnist: the MNIST IDX files' directory).")
    integer("eval_size", 10000, "Size of the test dataset.", lower_bound=1)
    string("hparams_override", None,
           "A string of form key=value,key=value to override the hparams of this experiment. "
           "--model=em also takes preset=NAME, applied first: smallnorb_official (every "
           "official capsule_em value) or mnist_small (the paper's small model with the "
           "default recipe); see docs/em_routing.md.")
    integer("max_steps", 1000, "Number of steps to train.", lower_bound=0)
    enum("model", "capsule", ["capsule", "baseline", "em"], "The model to use.")
    enum("dataset", "mnist", ["mnist", "multimnist", "norb", "cifar10"],
         "The dataset to use (multimnist: pairs made on the fly from the MNIST IDX files, "
         "with --num_targets=2).")
    integer("num_gpus", 1, "Number of GPUs to train on (testing uses one device).",
            lower_bound=0)
    integer("local_workers", 0,
            "Run this command as N workers of a cluster on this machine (TF_CONFIG on free "
            "loopback ports; output prefixed by task index). See docs/distributed.md "
            "(several machines).", lower_bound=0)
    integer("num_targets", 1, "Number of targets to detect (1 or 2).", lower_bound=1,
            upper_bound=2)
    integer("num_trials", 1, "Number of trials for ensemble evaluation.", lower_bound=1)
    integer("save_step", 1500, "How often to save checkpoints.", lower_bound=1)
    string("summary_dir", None, "Main directory for the experiments.")
    string("checkpoint", None,
           "The model checkpoint for evaluation; with --num_trials > 1 a pattern with {} for "
           "the trial number.")
    boolean("train", True, "Either train the model or test the model.")
    boolean("validate", False, "Run training/eval in validation mode.")
    # Additions to the reference's flags.
    integer("random_shift", 0,
            "MNIST training: shift the unshifted training records at random within +-N pixels "
            "instead of reading the 1.3 GB 2-shifted file (0: read the reference's file).",
            lower_bound=0)
    boolean("distort", False, "MNIST: random 24x24 crops and rotations.")
    integer("num_pairs", 1, "--dataset=multimnist: test pairs per test digit (set "
            "--eval_size to 10000 x this).", lower_bound=1)
    integer("batch_size", 128,
            "Training batch size over all devices and workers (the reference's 128).",
            lower_bound=1)
    integer("seed", None, "Seed of the run: its initial weights, the order and content of its "
            "batches (shuffles, shifts, pairs, distortions), whatever the number of workers "
            "and across resumes (unset: every run draws its own).")
    integer("eval_interval_secs", 60,
            "Continuous evaluation: seconds between looks for a new checkpoint.", lower_bound=1)
    integer("eval_timeout_secs", 6 * 3600,
            "Continuous evaluation: stop after this long without a new checkpoint.",
            lower_bound=0)
    boolean("mixed_bfloat16", False,
            "Keras' 'mixed_bfloat16' policy: convolutions and votes in bfloat16, routing, "
            "lengths, decoder and losses in float32, weights float32 (checkpoints unchanged). "
            "Faster training on a CPU with AVX512-BF16 (benchmarks/README.md).")
    integer("keep_checkpoints", 5,
            "Training: keep the newest N checkpoints (0: all; the reference kept 1000).",
            lower_bound=0)
    boolean("allow_hparams_change", False,
            "Training: let a resumed run change its hparams or settings (recorded in "
            "train/hparams.json); without it such a resume stops, listing the differences.")
    flags.register_multi_flags_validator(
        ["local_workers", "train"], lambda flag: flag["train"] or not flag["local_workers"],
        message="--local_workers is for training; evaluation runs in one process",
        flag_values=values)
    boolean("patching", False,
            "norb testing: score the EM-routing reference's 13 crops of each image, each "
            "crop's class scores normalised to sum 1, summed over the crops.")
    flags.register_multi_flags_validator(
        ["patching", "dataset"], lambda f: not f["patching"] or f["dataset"] == "norb",
        message="--patching: the test-time crops are defined for --dataset=norb only",
        flag_values=values)


@dataclasses.dataclass(frozen=True)
class Config:
    """The flags of one run (their meanings: `define_flags`)."""

    data_dir: str | None
    eval_size: int
    hparams_override: str | None
    max_steps: int
    model: str
    dataset: str
    num_gpus: int
    local_workers: int
    num_targets: int
    num_trials: int
    save_step: int
    summary_dir: str | None
    checkpoint: str | None
    train: bool
    validate: bool
    random_shift: int
    distort: bool
    num_pairs: int
    batch_size: int
    seed: int | None
    eval_interval_secs: int
    eval_timeout_secs: int
    mixed_bfloat16: bool
    patching: bool
    keep_checkpoints: int
    allow_hparams_change: bool

    @property
    def dtype_policy(self) -> str:
        """Keras' dtype policy that --mixed_bfloat16 names."""
        return "mixed_bfloat16" if self.mixed_bfloat16 else "float32"

    @classmethod
    def from_flags(cls, values: flags.FlagValues = FLAGS) -> Config:
        """The config of parsed flag values."""
        return cls(**{field.name: values[field.name].value for field in dataclasses.fields(cls)})


def parse_config(argv: Sequence[str]) -> Config:
    """The config of command-line arguments `argv` (without the program name), parsed and
    checked as on the command line (absl's flags.Error for a bad flag), FLAGS untouched."""
    values = flags.FlagValues()
    define_flags(values)
    values(["experiment.py", *argv])
    return Config.from_flags(values)


# ---- pieces shared by the runs ------------------------------------------------------------

def _dataset_info(config: Config):
    import input_data

    return input_data.dataset_info(config.dataset, config.num_targets, config.distort)


def _inputs(config: Config, split: str, batch_size: int, repeat: bool = False,
            shard: tuple[int, int] | None = None, skip_steps: int = 0):
    import input_data

    if not config.data_dir:
        raise UsageError("--data_dir is required (see docs/data.md)")
    return input_data.inputs(
        config.dataset, split, config.data_dir, batch_size, num_targets=config.num_targets,
        validate=config.validate, distort=config.distort,
        random_shift=config.random_shift if split == "train" else 0, repeat=repeat,
        seed=config.seed, shard=shard, num_pairs=config.num_pairs,
        patching=config.patching and split == "test", skip_steps=skip_steps,
    )


def _data_error_line(config: Config, error: Exception) -> str:
    """A read error of the run's data in one line naming the damaged file."""
    import input_data

    return input_data.read_error_line(
        error, config.dataset, "train" if config.train else "test", config.data_dir,
        config.num_targets, config.validate, config.random_shift)


def _strategy(config: Config):
    """MultiWorkerMirroredStrategy under TF_CONFIG, else MirroredStrategy for --num_gpus > 1."""
    from capsules import distribute

    try:
        return distribute.strategy_from_environment(config.num_gpus)
    except UsageError as error:  # about TF_CONFIG or num_gpus=N
        message = str(error)
        raise UsageError(message if message.startswith("TF_CONFIG") else f"--{message}") from None


def _load_model(config: Config, checkpoint: str):
    """The model of `checkpoint` (its run file; for a TF1 checkpoint --model and the data
    flags) in the precision --mixed_bfloat16 asks for, whatever it was trained in, checked
    to take the images of --dataset, --num_targets and --distort."""
    from capsules.checkpoints import load_model

    info = _dataset_info(config)
    model = load_model(checkpoint, config.hparams_override, model=config.model,
                       dataset_info=info,
                       dtype=config.dtype_policy)
    takes = (*model.image_shape, model.num_classes, model.num_targets)
    given = (info.height, info.width, info.depth, info.num_classes, info.num_targets)
    if takes != given:
        raise UsageError(
            f"checkpoint {checkpoint} takes {'x'.join(map(str, takes[:3]))} images of "
            f"{takes[3]} classes, {takes[4]} target(s); --dataset={config.dataset} "
            f"--num_targets={config.num_targets} --distort={str(config.distort).lower()} "
            f"gives {'x'.join(map(str, given[:3]))}, {given[3]} classes, {given[4]} target(s)")
    return model


def _write_test_summary(summary_dir: str, result, step: int) -> None:
    import tensorflow as tf

    writer = tf.summary.create_file_writer(os.path.join(summary_dir, "test"))
    with writer.as_default():
        tf.summary.scalar("correct_prediction", result.total - result.wrong, step=step)
        tf.summary.scalar("wrong_prediction", result.wrong, step=step)
        tf.summary.scalar("almost_wrong_prediction", result.almost_wrong, step=step)
        tf.summary.scalar("accuracy", result.accuracy, step=step)
    writer.close()


def _test_result(config: Config, checkpoint: str):
    from capsules import evaluation

    model = _load_model(config, checkpoint)
    logits, labels = evaluation.collect_logits(model, _inputs(config, "test", 100),
                                               config.eval_size)
    if len(logits) < config.eval_size:
        print(f"warning: the test data ended after {len(logits)} of --eval_size="
              f"{config.eval_size} examples", file=sys.stderr)
    return evaluation.score(logits, labels, config.num_targets)


# ---- the runs -------------------------------------------------------------------------------

def run_training(config: Config) -> int:
    """Trains --model on --dataset to --max_steps in summary_dir/train; returns the last step."""
    import keras

    from capsules import distribute, training
    from capsules.hparams import parse_overrides
    from capsules.models import MODELS, build_model

    if not config.summary_dir:
        raise UsageError("--summary_dir is required for training")
    strategy = _strategy(config)  # before any other TensorFlow op
    hparams = parse_overrides(MODELS[config.model].hparams_class(), config.hparams_override)
    if config.seed is not None:
        # Keras' initializers draw their seeds from Python's generator as the layers are
        # made; seeded, every worker makes the same weights, as one process would.
        keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = build_model(config.model, hparams, _dataset_info(config))
        model.compile()
    print(f"total_params: {model.count_params()}")
    _inputs(config, "train", config.batch_size)  # checks the files before the run's folder

    def dataset(step: int):
        # A resumed run continues the (seeded) stream after the steps it trained on.
        return distribute.distributed_inputs(
            strategy, lambda batch_size, shard: _inputs(config, "train", batch_size, True,
                                                        shard, skip_steps=step),
            config.batch_size)

    return training.train(
        model, dataset, os.path.join(config.summary_dir, "train"), config.max_steps,
        config.save_step, config.batch_size, strategy=strategy,
        run_flags=dataclasses.asdict(config), keep_checkpoints=config.keep_checkpoints or None,
        allow_changes=config.allow_hparams_change,
    )


def run_evaluation(config: Config):
    """Evaluates --checkpoint once, or each new checkpoint of summary_dir/train until
    --eval_timeout_secs pass without one; prints and returns the (last) TestResult."""
    from capsules import checkpoints

    if config.checkpoint:
        checkpoint = checkpoints.resolve_checkpoint(config.checkpoint)
        result = _test_result(config, checkpoint)
        print(result.report(config.num_targets))
        if config.summary_dir:
            _write_test_summary(config.summary_dir, result,
                                checkpoints.checkpoint_step(checkpoint))
        return result
    if not config.summary_dir:
        raise UsageError("--train=false needs --checkpoint, or --summary_dir to watch")
    train_dir = os.path.join(config.summary_dir, "train")
    seen, last_new, result = None, time.monotonic(), None
    while time.monotonic() - last_new <= config.eval_timeout_secs:
        try:
            latest = checkpoints.resolve_checkpoint(train_dir)
        except FileNotFoundError:  # no checkpoint yet
            latest = None
        if latest is None or latest == seen:
            time.sleep(config.eval_interval_secs)
            continue
        seen, last_new = latest, time.monotonic()
        result = _test_result(config, latest)
        print(f"{latest}:\n{result.report(config.num_targets)}", flush=True)
        _write_test_summary(config.summary_dir, result, checkpoints.checkpoint_step(latest))
    return result


def run_ensemble(config: Config):
    """Sums the logits of --num_trials checkpoints (the reference's evaluate_ensemble), each
    its own model from its run file; prints and returns the TestResult."""
    from capsules import checkpoints, evaluation

    if not config.checkpoint or "{}" not in config.checkpoint:
        raise UsageError("--num_trials > 1 needs --checkpoint with {} for the trial number")
    paths = [checkpoints.resolve_checkpoint(config.checkpoint.format(trial))
             for trial in range(config.num_trials)]
    dataset = _inputs(config, "test", 100).cache()
    per_trial, labels = [], None
    for path in paths:
        model = _load_model(config, path)
        logits, labels = evaluation.collect_logits(model, dataset, config.eval_size)
        per_trial.append(logits)
    result = evaluation.score(evaluation.ensemble_logits(per_trial), labels, config.num_targets)
    print(result.report(config.num_targets))
    return result


@contextlib.contextmanager
def _precision(policy: str) -> Iterator[None]:
    """Keras' global dtype policy for the run (every model built in it takes it), restored
    afterwards."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def run(config: Config):
    """Trains (--train), evaluates an ensemble (--num_trials > 1) or evaluates; returns what
    the run function returns. A damaged data file is a UsageError naming it."""
    from capsules.errors import DataReadError
    from capsules.hparams import parse_overrides
    from capsules.models import MODELS

    try:  # checked before any work, in every mode
        parse_overrides(MODELS[config.model].hparams_class(), config.hparams_override)
    except ValueError as error:
        raise UsageError(f"--hparams_override: {error}") from None
    with _precision(config.dtype_policy):
        try:
            if config.train:
                return run_training(config)
            if config.num_trials > 1:
                return run_ensemble(config)
            return run_evaluation(config)
        except DataReadError as error:  # find and name the damaged data file
            raise UsageError(_data_error_line(config, error)) from error


def run_local_workers(config: Config) -> int:
    """The command line (sys.argv) without --local_workers, as --local_workers workers on
    loopback; returns the exit status (`capsules.local_cluster.run_workers`)."""
    from capsules import local_cluster

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--local_workers="):
            skip = False
        elif arg == "--local_workers":
            skip = True
        else:
            args.append(arg)
    return local_cluster.run_workers([*_this_command(), *args], config.local_workers)


def _this_command() -> list[str]:
    """Python and what it ran to start this program: a script (`python experiment.py`, the
    `capsules-experiment` console script) or a module (`python -m capsules.experiment`)."""
    main = sys.modules["__main__"]
    if main.__spec__ is not None:  # python -m MODULE: from the same folder, importable alike
        return [sys.executable, "-m", main.__spec__.name]
    return [sys.executable, os.path.abspath(main.__file__)]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = Config.from_flags(FLAGS)
    if config.local_workers:
        sys.exit(run_local_workers(config))

    from capsules.distribute import PREEMPTED_EXIT_CODE, Preempted, WorkerLostError
    from capsules.errors import FILE_ERRORS, error_line
    from capsules.training import NonFiniteLossError

    try:
        run(config)
    except Preempted as stop:
        print(f"experiment.py: {stop}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    # The project's own errors, and what the system says of a file or folder it cannot
    # read or write (e.g. an unwritable --summary_dir); others, bugs included, trace back.
    except (UsageError, NonFiniteLossError, WorkerLostError, *FILE_ERRORS) as error:
        print(f"experiment.py: error: {error_line(error)}", file=sys.stderr)
        sys.exit(1)


def console_main() -> None:
    """The command line: `python experiment.py`, `capsules-experiment` and
    `python -m capsules.experiment` run it."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    console_main()
