"""tensorflow-datasets as a source (`--data_dir=tfds:DIR`): tfds prepares MNIST from IDX
files this test writes (its download replaced by them, so no network) and `inputs` reads
the prepared data set."""

import numpy as np
import pytest

import input_data
from input_data.mnist import idx

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.mark.slow
def test_tfds_prepares_mnist_from_local_files_and_inputs_reads_it(tmp_path, monkeypatch):
    from tensorflow_datasets.image_classification import mnist as tfds_mnist

    rng = np.random.default_rng(0)
    sizes = {"train": 6, "test": 4}
    arrays = {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10)
              for split, n in sizes.items()}
    paths = {}
    for split, (images, labels) in arrays.items():
        for kind, blob in (("data", idx.encode_images(images)),
                           ("labels", idx.encode_labels(labels))):
            path = tmp_path / f"{split}-{kind}"
            path.write_bytes(blob)
            paths[f"{split}_{kind}"] = str(path)
    # tfds's MNIST builder downloads the four files and reads 60,000 + 10,000 examples.
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                        lambda self, urls: {key: paths[key] for key in urls})
    monkeypatch.setattr(tfds_mnist, "_TRAIN_EXAMPLES", sizes["train"])
    monkeypatch.setattr(tfds_mnist, "_TEST_EXAMPLES", sizes["test"])
    data_dir = tmp_path / "tfds"

    builder = tfds.builder("mnist", data_dir=str(data_dir))
    builder.download_and_prepare()
    assert builder.info.splits["test"].num_examples == sizes["test"]

    batch = next(iter(input_data.inputs("mnist", "test", f"tfds:{data_dir}", 4)))
    read = np.rint(batch["images"].numpy()[..., 0] * 255).astype(np.uint8)
    written = dict(zip((image.tobytes() for image in arrays["test"][0]), arrays["test"][1],
                       strict=True))  # tfds stores the examples in its own order
    assert sorted(image.tobytes() for image in read) == sorted(written)
    assert [written[image.tobytes()] for image in read] == batch["recons_label"].numpy().tolist()
    train = next(iter(input_data.inputs("mnist", "train", f"tfds:{data_dir}", 6, seed=1)))
    assert train["images"].shape == (6, 28, 28, 1)
