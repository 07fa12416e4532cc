"""MultiMNIST made on the fly from tiny IDX files: the reference's pair rules, the features
of the records' reader, seeds, the fixed test pairs (those mnist_shift.py writes)."""

import numpy as np
import pytest

import input_data
from input_data.mnist import mnist_shift, multimnist
from tests.test_input_mnist import collect, digits, find_shift, read_records, write_idx

NUM_TRAIN, NUM_TEST = 40, 12
TRAIN_LABELS = np.arange(NUM_TRAIN, dtype=np.uint8) % 10
TEST_LABELS = np.array([7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6], np.uint8)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> dict:
    """IDX files of random 'digits' whose pixel sums tell them apart (shifts lose nothing)."""
    data_dir = tmp_path_factory.mktemp("mnist")
    train, test = digits(NUM_TRAIN, seed=5), digits(NUM_TEST, seed=6)
    for images in (train, test):
        assert len(set(images.reshape(len(images), -1).sum(1))) == len(images)
    write_idx(data_dir, (train, TRAIN_LABELS), (test, TEST_LABELS))
    return {"dir": str(data_dir), "train": train, "test": test}


def source_index(image: np.ndarray, sources: np.ndarray) -> int:
    """The index of the source digit a shifted 36x36 image (float, pipeline scale) shows,
    after checking it is that digit padded by 4 and shifted within +-4."""
    pixels = np.round(image[..., 0] * 255).astype(np.uint8)
    (index,) = np.flatnonzero(sources.reshape(len(sources), -1).sum(1) == pixels.sum())
    find_shift(pixels, np.pad(sources[index], 4), 4)
    return int(index)


def check_pairs(batch: dict, sources: np.ndarray, labels: np.ndarray) -> list[tuple]:
    """Checks the reference's pair rules and the features' consistency; returns
    (first digit, second digit) indices of every pair."""
    assert batch["images"].shape[1:] == (36, 36, 1)
    np.testing.assert_array_equal(batch["recons_label"] != batch["spare_label"], True)
    np.testing.assert_array_equal(
        batch["labels"], np.eye(10)[batch["recons_label"]] + np.eye(10)[batch["spare_label"]])
    np.testing.assert_allclose(
        batch["images"], np.minimum(batch["recons_image"] + batch["spare_image"], 1), atol=1e-6)
    pairs = []
    for one, two, label_1, label_2 in zip(batch["recons_image"], batch["spare_image"],
                                          batch["recons_label"], batch["spare_label"],
                                          strict=True):
        first, second = source_index(one, sources), source_index(two, sources)
        assert (labels[first], labels[second]) == (label_1, label_2)
        pairs.append((first, second))
    return pairs


@pytest.mark.slow
def test_train_pairs_follow_the_reference_rules_each_digit_first_once_per_pass(mnist):
    one_pass = collect(input_data.inputs("multimnist", "train", mnist["dir"], 16, seed=3))
    assert one_pass["batch_sizes"] == [16, 16, 8]
    pairs = check_pairs(one_pass, mnist["train"], TRAIN_LABELS)
    assert sorted(first for first, _ in pairs) == list(range(NUM_TRAIN))
    first, second = (np.round(one_pass[key] * 255).astype(int)
                     for key in ("recons_image", "spare_image"))
    np.testing.assert_array_equal(np.round(one_pass["images"] * 255),
                                  np.minimum(first + second, 255))
    assert (first + second > 255).any()  # the clamp is exercised


@pytest.mark.slow
def test_train_stream_repeats_for_a_seed_and_changes_between_steps(mnist):
    def first_batches(seed, count=3):
        ds = input_data.inputs("multimnist", "train", mnist["dir"], 8, repeat=True, seed=seed)
        return list(ds.take(count).as_numpy_iterator())

    run, rerun, other = first_batches(1), first_batches(1), first_batches(2)
    for a, b in zip(run, rerun, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(run[0]["images"], run[1]["images"])
    assert not np.array_equal(run[0]["images"], other[0]["images"])
    # Past the first pass the stream goes on with new pairs: 40 digits, 8 per batch.
    many = first_batches(1, count=12)
    assert all(batch["images"].shape == (8, 36, 36, 1) for batch in many)
    pairs = [pair for batch in many[5:10] for pair in check_pairs(batch, mnist["train"],
                                                                  TRAIN_LABELS)]
    assert sorted(first for first, _ in pairs) == list(range(NUM_TRAIN))


@pytest.mark.parametrize("num_pairs", [1, 3])
def test_test_pairs_are_fixed_and_each_digit_comes_first_num_pairs_times(mnist, num_pairs):
    def run(seed=None):
        return collect(input_data.inputs("multimnist", "test", mnist["dir"], 5,
                                         num_pairs=num_pairs, seed=seed))

    out = run()
    assert sum(out["batch_sizes"]) == NUM_TEST * num_pairs and out["batch_sizes"][-1] <= 5
    for key, value in run().items():
        np.testing.assert_array_equal(value, out[key])
    assert not np.array_equal(run(seed=9)["images"], out["images"])
    pairs = check_pairs(out, mnist["test"], TEST_LABELS)
    firsts = [first for first, _ in pairs]
    assert firsts == list(np.repeat(np.arange(NUM_TEST), num_pairs))
    for i in range(NUM_TEST):  # one shift per first digit, as the reference; distinct partners
        mine = slice(i * num_pairs, (i + 1) * num_pairs)
        np.testing.assert_array_equal(out["recons_image"][mine],
                                      np.repeat(out["recons_image"][mine][:1], num_pairs, 0))
        assert len({second for _, second in pairs[mine]}) == num_pairs


def test_test_pairs_are_those_the_record_generator_writes_for_the_seed(mnist, tmp_path):
    out = collect(input_data.inputs("multimnist", "test", mnist["dir"], 7, num_pairs=2,
                                    seed=4))
    names = mnist_shift.write_multi(mnist["test"], TEST_LABELS, str(tmp_path / "multi"),
                                    shift=4, pad=4, num_pairs=2, max_shard=10, seed=4)
    records = [r for name in names for r in read_records(name)]

    def key(merged, first, second, label_1, label_2):
        return (merged.tobytes(), first.tobytes(), second.tobytes(), int(label_1), int(label_2))

    def pixels(images):
        return np.round(images * 255).astype(np.uint8).reshape(len(images), -1)

    mine = sorted(map(key, pixels(out["images"]), pixels(out["recons_image"]),
                      pixels(out["spare_image"]), out["recons_label"], out["spare_label"]))
    written = sorted(key(r["merged_raw"], r["image_raw_1"], r["image_raw_2"], r["label_1"],
                         r["label_2"]) for r in records)
    assert mine == written


def test_shift_digits_matches_the_generator_for_every_shift():
    image = digits(1, seed=8)[0]
    shifts = np.array([(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)], np.int32)
    shifted = multimnist.shift_digits(np.repeat(image[None], len(shifts), 0), shifts).numpy()
    for (dy, dx), out in zip(shifts, shifted, strict=True):
        np.testing.assert_array_equal(out[..., 0],
                                      mnist_shift.shift_image(np.pad(image, 4), dy, dx))


def test_shapes_and_options(mnist):
    info = input_data.dataset_info("multimnist")
    assert (info.height, info.width, info.depth, info.num_targets) == (36, 36, 1, 2)
    train = input_data.inputs("multimnist", "train", mnist["dir"], 4, num_targets=2,
                              repeat=True, seed=0)
    test = input_data.inputs("multimnist", "test", mnist["dir"], 4)
    for ds, batch in ((train, 4), (test, None)):
        assert {key: spec.shape.as_list() for key, spec in ds.element_spec.items()} == {
            "images": [batch, 36, 36, 1], "labels": [batch, 10],
            "recons_image": [batch, 36, 36, 1], "recons_label": [batch],
            "spare_image": [batch, 36, 36, 1], "spare_label": [batch]}
        assert ds.options().autotune.enabled is False  # docs/speed.md: no teardown stall


@pytest.mark.slow
def test_validate_holds_out_the_first_10000_training_digits(tmp_path):
    labels = np.arange(10004, dtype=np.uint8) % 10
    held_out = digits(4, seed=9)
    write_idx(tmp_path, (np.concatenate([digits(10000, seed=7), held_out]), labels),
              (digits(2), np.array([1, 2], np.uint8)))
    valid = collect(input_data.inputs("multimnist", "test", str(tmp_path), 2500,
                                      validate=True))
    np.testing.assert_array_equal(valid["recons_label"], labels[:10000])
    train = collect(input_data.inputs("multimnist", "train", str(tmp_path), 4, validate=True,
                                      seed=0))
    assert train["batch_sizes"] == [4]
    assert sorted(source_index(image, held_out) for image in train["recons_image"]) == [
        0, 1, 2, 3]
    for image in train["spare_image"]:  # partners from the same 4 digits
        source_index(image, held_out)


def test_bad_arguments_and_missing_files_name_what_is_wrong(mnist, tmp_path):
    with pytest.raises(ValueError, match="num_targets=1"):
        input_data.inputs("multimnist", "train", mnist["dir"], 4, num_targets=1)
    with pytest.raises(ValueError, match="num_pairs=0"):
        input_data.inputs("multimnist", "test", mnist["dir"], 4, num_pairs=0)
    with pytest.raises(ValueError, match="num_pairs=2: only for multimnist"):
        input_data.inputs("mnist", "test", mnist["dir"], 4, num_pairs=2)
    with pytest.raises(ValueError, match="num_pairs=12: some images have only"):
        input_data.inputs("multimnist", "test", mnist["dir"], 4, num_pairs=12)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte not found; make it "
                                                "with: python -m input_data.mnist.fetch"):
        input_data.inputs("multimnist", "test", str(tmp_path), 4)


def test_shards_take_alternate_batches_of_the_stream(mnist):
    def batches(shard=None):
        ds = input_data.inputs("multimnist", "train", mnist["dir"], 4, repeat=True, seed=2,
                               shard=shard)
        return list(ds.take(4).as_numpy_iterator())

    whole, first, second = batches(), batches((2, 0)), batches((2, 1))
    for i, batch in enumerate(whole):
        np.testing.assert_array_equal(batch["images"], (first, second)[i % 2][i // 2]["images"])
