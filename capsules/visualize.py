"""Pictures of what a trained CapsNet learned (matplotlib, headless PNG files).

  python -m capsules.visualize --checkpoint=runs/mnist/train/model.ckpt-N \
      --data_dir=data/mnist --output_dir=pictures [--summary_dir=runs/mnist]
  python -m capsules.visualize --checkpoint=CKPT --dataset=multimnist \
      --data_dir=data/mnist --output_dir=pictures    # pairs made from the MNIST IDX files
  python -m capsules.visualize --checkpoint=CKPT --num_targets=2 \
      --data_dir=data/mnist/multitest_4shifted_mnist.tfrecords@N --output_dir=pictures

writes into --output_dir, from the first test images of --data_dir:
  reconstructions.png  (one target) test images above their reconstructions from the
                       predicted capsule, with true and predicted labels;
  perturbations.png    each dimension of the predicted capsule tweaked from -0.25 to +0.25
                       in steps of 0.05 and decoded (the paper's Figure 4);
  multimnist.png       (two targets) the merged input and the reconstructions from the two
                       longest capsules drawn over it in red and green (the paper's Figure 5);
  capsule_lengths.png  the class capsule lengths of test image --image_index;
  curves.png           (--summary_dir) training loss, accuracy, test error and learning rate
                       from the TensorBoard event files of summary_dir/train and /test.
A CapsNet without decoder (remake=false) gets only capsule_lengths.png and curves.png.
"""

from __future__ import annotations

# ruff: noqa: E402 - a command quiets TensorFlow's C++ logs before the imports below load it
from capsules.tf_logs import quiet_tensorflow_logs

if __name__ == "__main__":
    quiet_tensorflow_logs()

import logging
import os
import sys

import numpy as np
import tensorflow as tf
from absl import app, flags
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import input_data
from capsules import checkpoints, datasets
from capsules import features as keys
from capsules.errors import FILE_ERRORS, MissingFileError, UsageError
from capsules.models import CapsNet, unflatten_depth_major

DPI = 100
PERTURBATION_STEPS = tuple(round(0.05 * i, 2) for i in range(-5, 6))
"""The tweaks added to one capsule dimension at a time: -0.25, -0.20, ..., +0.25."""

RECONSTRUCTIONS = "reconstructions.png"
PERTURBATIONS = "perturbations.png"
MULTIMNIST = "multimnist.png"
CAPSULE_LENGTHS = "capsule_lengths.png"
CURVES = "curves.png"

# Layout in pixels (at DPI): image cells, the row-name column and the title band above.
_CELL = 100
_ROW_NAMES = 100
_TITLES = 40
_SMALL_CELL = 48
_DIM_NAMES = 60
_BLOCK_TITLES = 50
_BLOCK_GAP = 24
_LENGTHS_SIZE = (800, 320)
_CURVES_SIZE = (1200, 800)
_FIRST, _SECOND = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])  # multimnist colours


# -- model and data ----------------------------------------------------------------------

def load_capsnet(checkpoint: str, dataset: str = "mnist", num_targets: int | None = None,
                 distort: bool = False, hparams_override: str | None = None) -> CapsNet:
    """The CapsNet of `checkpoint` (`capsules.checkpoints.load_model`), its weights restored.

    The model comes from the run file next to the checkpoint, its hparams changed by
    `hparams_override` ("key=value,..."); `dataset`, `num_targets` and `distort` give the
    images' shape where the run file does not (a TF1 checkpoint, an older run file).
    `checkpoint` may be a prefix, its .index file or a folder (its latest checkpoint).
    Raises MissingFileError for a missing checkpoint and UsageError for one that does not
    fit, is damaged or is no CapsNet's.
    """
    model = checkpoints.load_model(
        checkpoint, hparams_override, model="capsule",
        dataset_info=input_data.dataset_info(dataset, num_targets, distort))
    if not isinstance(model, CapsNet):
        raise UsageError(f"checkpoint {checkpoint} is a {type(model).__name__}'s; the pictures "
                         "need a CapsNet's")
    return model


def read_test_examples(data_dir: str, count: int, start: int = 0, dataset: str = "mnist",
                       num_targets: int | None = None,
                       distort: bool = False) -> dict[str, np.ndarray]:
    """Test examples start..start+count-1 (in file order) as numpy feature dicts of
    `input_data.inputs` (images, labels, recons_*, for two targets spare_*); num_targets
    None: the dataset's."""
    num_targets = datasets.dataset_info(dataset, num_targets, distort).num_targets
    data = input_data.inputs(dataset, "test", data_dir, min(count, 100), num_targets=num_targets,
                             distort=distort)
    try:
        for features in data.unbatch().skip(start).batch(count).take(1):
            if features[keys.IMAGES].shape[0] == count:
                return {name: value.numpy() for name, value in features.items()}
    except tf.errors.OpError as error:  # a damaged file: name it
        raise UsageError(input_data.read_error_line(error, dataset, "test", data_dir,
                                                    num_targets)) from None
    raise UsageError(f"{data_dir}: the test data has no example {start + count - 1} (examples "
                     f"0..{start + count - 1} are drawn; see --num_images, --image_index)")


def _true_classes(labels: np.ndarray) -> list[list[int]]:
    """The labelled classes of k-hot labels `[n, classes]`, per example."""
    return [np.flatnonzero(row > 0.5).tolist() for row in labels]


def _predicted_classes(model: CapsNet, images: np.ndarray) -> np.ndarray:
    """The classes of the num_targets longest capsules `[n, num_targets]`, longest first."""
    lengths = model(images, training=False)
    return tf.math.top_k(lengths, k=model.num_targets).indices.numpy()


def perturbed_reconstructions(model: CapsNet, images: np.ndarray,
                              steps: tuple[float, ...] = PERTURBATION_STEPS
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Decodings of each image's predicted capsule with one dimension tweaked at a time.

    Returns (pictures `[n, atoms, len(steps), height, width, depth]`, where [i, d, s] is
    image i's predicted capsule plus steps[s] in dimension d, decoded; predicted classes
    `[n]`).
    """
    if model.decoder is None:
        raise ValueError("this CapsNet has no decoder (hparams.remake=False)")
    capsules = model.class_capsule_outputs(images).numpy()  # [n, classes, atoms]
    predicted = _predicted_classes(model, images)[:, 0]
    num_images, num_classes, atoms = capsules.shape
    mask = np.eye(num_classes, dtype=np.float32)[predicted]  # [n, classes]
    tweaks = np.eye(atoms, dtype=np.float32)[:, None, :] * np.float32(steps)[None, :, None]
    tweaked = (capsules[:, None, None]
               + mask[:, None, None, :, None] * tweaks[None, :, :, None, :])
    tweaked = tweaked.reshape(-1, num_classes, atoms)
    masks = np.repeat(mask, atoms * len(steps), axis=0)
    pictures = unflatten_depth_major(model.decoder([tweaked, masks]), model.image_shape).numpy()
    return pictures.reshape(num_images, atoms, len(steps), *model.image_shape), predicted


# -- figures -------------------------------------------------------------------------------

def _figure(width: int, height: int) -> Figure:
    """A figure of width x height pixels at DPI."""
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _show_image(figure: Figure, image: np.ndarray, left: int, top: int, size: int) -> Axes:
    """Draws `image` [h, w, depth] in [0, 1] into the size x size pixel square at (left, top)
    from the figure's top-left corner (grey; depth 3 in colour; depth 2 its first channel)."""
    width, height = figure.get_size_inches() * DPI
    axes = figure.add_axes((left / width, 1 - (top + size) / height, size / width,
                            size / height))
    image = np.clip(image, 0.0, 1.0)
    if image.ndim == 3 and image.shape[-1] != 3:
        image = image[..., 0]
    axes.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_axis_off()
    return axes


def _text(figure: Figure, left: float, top: float, text: str, **style) -> None:
    """Writes `text` at (left, top) pixels from the figure's top-left corner."""
    width, height = figure.get_size_inches() * DPI
    figure.text(left / width, 1 - top / height, text, **style)


def _save(figure: Figure, path: str) -> str:
    # Under a temporary name, then renamed: a picture already there is never half-written.
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        figure.savefig(temporary, dpi=DPI, format=os.path.splitext(path)[1][1:] or "png")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _two_row_figure(top: np.ndarray, bottom: np.ndarray, titles: list[str],
                    mistakes: list[bool], row_names: tuple[str, str]) -> Figure:
    """Images `top` above `bottom`, a title over each column (red for a mistake).

    Size: (100 + 100 n) x 240 pixels for n columns.
    """
    figure = _figure(_ROW_NAMES + _CELL * len(top), _TITLES + 2 * _CELL)
    for column, (upper, lower) in enumerate(zip(top, bottom, strict=True)):
        left = _ROW_NAMES + column * _CELL
        axes = _show_image(figure, upper, left + 4, _TITLES + 4, _CELL - 8)
        axes.set_title(titles[column], fontsize=9, color="red" if mistakes[column] else "black")
        _show_image(figure, lower, left + 4, _TITLES + _CELL + 4, _CELL - 8)
    for row, name in enumerate(row_names):
        _text(figure, _ROW_NAMES - 8, _TITLES + (row + 0.5) * _CELL, name, ha="right",
              va="center", fontsize=8)
    return figure


def plot_reconstructions(model: CapsNet, examples: dict[str, np.ndarray], path: str) -> str:
    """Writes test images above their reconstructions from the predicted capsule, titled
    with the true and the predicted label; returns `path`. (100 + 100 n) x 240 pixels."""
    images = examples[keys.IMAGES]
    predicted = _predicted_classes(model, images)[:, 0]
    truth = [classes[0] for classes in _true_classes(examples[keys.LABELS])]
    remakes = model.reconstruct(images, predicted).numpy()
    titles = [f"label {t}\npredicted {p}" for t, p in zip(truth, predicted, strict=True)]
    mistakes = [t != p for t, p in zip(truth, predicted, strict=True)]
    return _save(_two_row_figure(images, remakes, titles, mistakes, ("input", "reconstruction")),
                 path)


def plot_multimnist(model: CapsNet, examples: dict[str, np.ndarray], path: str) -> str:
    """Writes MultiMNIST inputs above the reconstructions from their two longest capsules,
    red and green over the dimmed input, titled L: true labels, R: the reconstructed
    classes (the paper's Figure 5); returns `path`. (100 + 100 n) x 240 pixels."""
    images = examples[keys.IMAGES]
    predicted = _predicted_classes(model, images)  # [n, 2]
    first = model.reconstruct(images, predicted[:, 0]).numpy()[..., :1]
    second = model.reconstruct(images, predicted[:, 1]).numpy()[..., :1]
    overlays = np.clip(0.35 * images[..., :1] + first * _FIRST + second * _SECOND, 0.0, 1.0)
    truth = _true_classes(examples[keys.LABELS])
    titles = [f"L: {', '.join(map(str, t))}\nR: {p[0]}, {p[1]}"
              for t, p in zip(truth, predicted, strict=True)]
    mistakes = [sorted(t) != sorted(p) for t, p in zip(truth, predicted.tolist(), strict=True)]
    return _save(_two_row_figure(images, overlays, titles, mistakes, ("input", "R (red, green)")),
                 path)


def plot_perturbations(model: CapsNet, images: np.ndarray, path: str,
                       steps: tuple[float, ...] = PERTURBATION_STEPS) -> str:
    """Writes, for each image, its predicted capsule decoded with each dimension (rows)
    tweaked by each of `steps` (columns), images side by side; returns `path`.

    Size: (60 + 528 n + 24 (n - 1)) x 818 pixels for n images and 16-dimensional capsules
    (11 columns and 16 rows of 48-pixel cells per image, row names and titles around).
    """
    pictures, predicted = perturbed_reconstructions(model, images, steps)
    num_images, atoms, num_steps = pictures.shape[:3]
    block = num_steps * _SMALL_CELL
    figure = _figure(_DIM_NAMES + num_images * block + (num_images - 1) * _BLOCK_GAP,
                     _BLOCK_TITLES + atoms * _SMALL_CELL)
    for i in range(num_images):
        left = _DIM_NAMES + i * (block + _BLOCK_GAP)
        _text(figure, left + block / 2, 12, f"predicted {predicted[i]}: dimension + tweak",
              ha="center", va="center", fontsize=10)
        for step, value in enumerate(steps):
            _text(figure, left + (step + 0.5) * _SMALL_CELL, _BLOCK_TITLES - 10,
                  f"{value:+.2f}", ha="center", va="center", fontsize=7)
        for dim in range(atoms):
            for step in range(num_steps):
                _show_image(figure, pictures[i, dim, step], left + step * _SMALL_CELL + 1,
                            _BLOCK_TITLES + dim * _SMALL_CELL + 1, _SMALL_CELL - 2)
    for dim in range(atoms):
        _text(figure, _DIM_NAMES - 6, _BLOCK_TITLES + (dim + 0.5) * _SMALL_CELL,
              f"dim {dim + 1}", ha="right", va="center", fontsize=8)
    return _save(figure, path)


def plot_capsule_lengths(model: CapsNet, example: dict[str, np.ndarray], index: int,
                         path: str) -> str:
    """Writes test image `index` (the one example of `example`) beside the lengths of its
    class capsules as bars, the predicted classes highlighted; returns `path`. 800 x 320
    pixels."""
    image = example[keys.IMAGES][:1]
    lengths = model(image, training=False).numpy()[0]
    predicted = _predicted_classes(model, image)[0].tolist()
    truth = _true_classes(example[keys.LABELS][:1])[0]
    figure = _figure(*_LENGTHS_SIZE)
    _show_image(figure, image[0], 20, 40, 260)
    axes = figure.add_axes((0.43, 0.15, 0.54, 0.72))
    classes = np.arange(len(lengths))
    colours = ["tab:orange" if c in predicted else "tab:blue" for c in classes]
    axes.bar(classes, lengths, color=colours)
    if model.hparams.loss_type == "margin":
        for level in (0.9, 0.1):  # the margin loss's m+ and m-
            axes.axhline(level, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xticks(classes)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("class")
    axes.set_ylabel("capsule length")
    figure.suptitle(f"test image {index}: label {', '.join(map(str, truth))}, predicted "
                    f"{', '.join(map(str, predicted))}", fontsize=11,
                    color="black" if sorted(truth) == sorted(predicted) else "red")
    return _save(figure, path)


def read_scalars(directory: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scalar summaries of the TensorBoard event files in `directory`: tag -> (steps,
    values), sorted by step; a step written twice (a resumed run) keeps the later value."""
    by_tag: dict[str, dict[int, float]] = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(directory, "events.out.tfevents.*"))):
        try:
            for event in tf.compat.v1.train.summary_iterator(path):
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        number = value.simple_value
                    elif value.HasField("tensor") and not value.tensor.tensor_shape.dim:
                        number = float(tf.make_ndarray(value.tensor))
                    else:
                        continue  # images, histograms
                    by_tag.setdefault(value.tag, {})[event.step] = number
        except tf.errors.DataLossError:
            pass  # the unfinished last record of a file still being written
    return {tag: (np.array(sorted(values)), np.array([values[s] for s in sorted(values)]))
            for tag, values in by_tag.items()}


def _smoothed(values: np.ndarray) -> np.ndarray:
    """Trailing running mean over ~1% of the values (at least 1), as long as `values`."""
    window = max(1, len(values) // 100)
    sums = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_curves(summary_dir: str, path: str) -> str:
    """Writes training loss, accuracy, test error and learning rate over steps from the
    event files of summary_dir/train and summary_dir/test; returns `path`. 1200 x 800 pixels.

    Raises MissingFileError when neither directory holds scalar summaries.
    """
    train = read_scalars(os.path.join(summary_dir, "train"))
    test = read_scalars(os.path.join(summary_dir, "test"))
    if not train and not test:
        raise MissingFileError(f"no TensorBoard scalars in {summary_dir}/train or "
                                f"{summary_dir}/test (--summary_dir)")
    test_error = {}
    if "accuracy" in test:
        steps, accuracy = test["accuracy"]
        test_error["test error"] = (steps, 100.0 * (1.0 - accuracy))
    panels = (
        ("training loss", {tag: train[tag] for tag in
                           ("loss", "classification_loss", "reconstruction_loss")
                           if tag in train}, "log"),
        ("accuracy", {f"{name} accuracy": scalars["accuracy"] for name, scalars in
                      (("training", train), ("test", test)) if "accuracy" in scalars},
         "linear"),
        ("test error (%)", test_error, "log"),
        ("learning rate", {"learning rate": train["learning_rate"]}
         if "learning_rate" in train else {}, "linear"),
    )
    figure = _figure(*_CURVES_SIZE)
    for axes, (title, curves, scale) in zip(figure.subplots(2, 2).flat, panels, strict=True):
        axes.set_title(title)
        axes.set_xlabel("step")
        if not curves:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
            continue
        for name, (steps, values) in curves.items():
            if len(values) > 100:  # per-step training values: raw, faint, and a running mean
                line = axes.plot(steps, values, alpha=0.25, linewidth=0.6)[0]
                axes.plot(steps, _smoothed(values), color=line.get_color(), label=name)
            else:
                axes.plot(steps, values, marker=".", label=name)
        if scale == "log" and all((values > 0).all() for _, values in curves.values()):
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


# -- all pictures ----------------------------------------------------------------------------

def write_pictures(output_dir: str, checkpoint: str | None = None, data_dir: str | None = None,
                   summary_dir: str | None = None, dataset: str = "mnist",
                   num_targets: int | None = None, distort: bool = False,
                   hparams_override: str | None = None, num_images: int = 10,
                   num_perturbed: int = 3, image_index: int = 0) -> list[str]:
    """Writes the pictures of the module docstring into `output_dir`; returns their paths.

    The model pictures need `checkpoint` and `data_dir` (test images, the first
    max(num_images, num_perturbed) of them and number `image_index`); curves.png needs
    `summary_dir`. num_targets None: the dataset's (2 for multimnist, whose test pairs are
    made from the MNIST IDX files in `data_dir`, else 1). Raises MissingFileError for a
    missing checkpoint, data or summaries and UsageError for bad arguments, with one-line
    messages.
    """
    if not checkpoint and not summary_dir:
        raise UsageError("nothing to draw: give --checkpoint and --data_dir, or --summary_dir")
    if checkpoint and not data_dir:
        raise UsageError("--checkpoint needs --data_dir (the test images to draw)")
    if num_images < 1 or num_perturbed < 1 or image_index < 0:
        raise UsageError("num_images and num_perturbed must be >= 1, image_index >= 0")
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    if summary_dir:
        paths.append(plot_curves(summary_dir, os.path.join(output_dir, CURVES)))
    if not checkpoint:
        return paths
    checkpoint = checkpoints.resolve_checkpoint(checkpoint)
    num_targets = datasets.dataset_info(dataset, num_targets, distort).num_targets
    data = {"dataset": dataset, "num_targets": num_targets, "distort": distort}
    examples = read_test_examples(data_dir, max(num_images, num_perturbed), **data)
    one = read_test_examples(data_dir, 1, start=image_index, **data)
    model = load_capsnet(checkpoint, hparams_override=hparams_override, **data)
    paths.append(plot_capsule_lengths(model, one, image_index,
                                      os.path.join(output_dir, CAPSULE_LENGTHS)))
    if model.decoder is None:
        logging.warning("%s has no decoder (remake=False): no reconstructions drawn",
                        checkpoint)
        return paths
    first = {name: value[:num_images] for name, value in examples.items()}
    if num_targets == 1:
        paths.append(plot_reconstructions(model, first, os.path.join(output_dir,
                                                                      RECONSTRUCTIONS)))
    else:
        paths.append(plot_multimnist(model, first, os.path.join(output_dir, MULTIMNIST)))
    paths.append(plot_perturbations(model, examples[keys.IMAGES][:num_perturbed],
                                    os.path.join(output_dir, PERTURBATIONS)))
    return paths


# -- command line ----------------------------------------------------------------------------

def define_flags() -> None:
    """The flags of `python -m capsules.visualize`."""
    flags.DEFINE_string("checkpoint", None, "The CapsNet checkpoint (prefix model.ckpt-N).")
    flags.DEFINE_string("data_dir", None, "The data directory (MultiMNIST records: PREFIX@N).")
    flags.DEFINE_string("output_dir", None, "Where the PNG files go.")
    flags.DEFINE_string("summary_dir", None,
                        "An experiment directory: curves.png from its train/ and test/ events.")
    flags.DEFINE_enum("dataset", "mnist", list(datasets.DATASETS),
                      "The dataset to use (multimnist: test pairs made from the MNIST IDX "
                      "files of --data_dir).")
    flags.DEFINE_integer("num_targets", None, "Number of targets (2: MultiMNIST; default: "
                         "the dataset's).", lower_bound=1, upper_bound=2)
    flags.DEFINE_bool("distort", False, "MNIST: the model reads 24x24 central crops.")
    flags.DEFINE_string("hparams_override", None,
                        "key=value,key=value applied to the checkpoint's hparams.")
    flags.DEFINE_integer("num_images", 10, "Test images in reconstructions/multimnist.png.",
                         lower_bound=1)
    flags.DEFINE_integer("num_perturbed", 3, "Test images in perturbations.png.",
                         lower_bound=1)
    flags.DEFINE_integer("image_index", 0, "The test image of capsule_lengths.png.",
                         lower_bound=0)
    flags.mark_flag_as_required("output_dir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    try:
        paths = write_pictures(
            f.output_dir, f.checkpoint, f.data_dir, f.summary_dir, f.dataset, f.num_targets,
            f.distort, f.hparams_override, f.num_images, f.num_perturbed, f.image_index)
    except (UsageError, *FILE_ERRORS) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"visualize: error: {message}", file=sys.stderr)
        sys.exit(1)
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
