"""Labels from a CSV or TSV file (``--labels``), and the validation folder's three names: what a labels
file gives (classes, splits, paths relative or absolute), every bad row as one line naming it, the
image cache keyed on the files, and a run trained from one resumed bit for bit and evaluated."""
import json
import os
import shutil

import pytest
import torch

from conftest import (assert_one_line_error, cnnlab, cnnlab_here, make_folder, same_run, snapshot, start,
                      wait_for_epochs)
from cnnlab.config import TrainConfig, TransferConfig, from_record
from cnnlab.data import load_labelled, load_splits
from cnnlab.errors import CnnlabError

NAMES = {"class_0": "zebra", "class_1": "cat", "class_2": "dog"}  # labels that sort otherwise than the folders


def write_labels(path, root, rows, header=("image", "label"), sep=","):
    """A labels file at ``path``: ``header``, then ``rows`` (tuples of fields)."""
    path.write_text("\n".join(sep.join(map(str, row)) for row in [header, *rows]) + "\n")
    return path


def listing(root, absolute=False, split=None):
    """(image, label[, split]) for every image under ``root``, labelled by NAMES; ``split(i)``: the
    split of the image at index i within its class."""
    rows = []
    for folder in sorted(root.iterdir()):
        for i, image in enumerate(sorted(folder.iterdir())):
            path = image if absolute else image.relative_to(root)
            rows.append((path, NAMES[folder.name]) + ((split(i),) if split else ()))
    return rows


@pytest.fixture
def photos(tmp_path):
    return make_folder(tmp_path / "photos", classes=3, per_class=10)


def test_a_csv_with_relative_paths_gives_sorted_classes_and_carved_splits(photos, tmp_path):
    labels = write_labels(tmp_path / "labels.csv", photos, listing(photos))
    splits = load_splits(str(photos), 32, val_split=0.2, test_split=0.2, seed=0, labels=str(labels))
    assert splits.class_names == ["cat", "dog", "zebra"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)
    for part in (splits.train, splits.val, splits.test):  # stratified: every class in every split
        assert torch.bincount(part.labels, minlength=3).min() > 0
        for file, label in zip(part.files, part.labels.tolist()):  # each image keeps its file's label
            assert NAMES[os.path.basename(os.path.dirname(file))] == splits.class_names[label]
    assert splits.info["labels_file"] == str(labels.resolve())


@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "Validation"])
def test_a_tsv_with_absolute_paths_and_a_split_column_gives_those_splits(photos, tmp_path, val_name):
    which = lambda i: "train" if i < 6 else val_name if i < 8 else "test"  # noqa: E731
    rows = [(label, split, image) for image, label, split in listing(photos, absolute=True, split=which)]
    labels = write_labels(tmp_path / "labels.tsv", photos, rows, header=("Label", "split", "image"), sep="\t")
    splits = load_splits(str(tmp_path), 32, val_split=0.3, test_split=0.3, labels=str(labels))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)  # as given: nothing carved
    assert all(os.path.basename(f) in ("img_006.png", "img_007.png") for f in splits.val.files)
    assert splits.info["given_splits"] == ["test", "train", "val"]


def test_a_split_column_without_val_rows_has_validation_carved_from_train(photos, tmp_path):
    labels = write_labels(tmp_path / "l.csv", photos, listing(photos, split=lambda i: "test" if i < 2 else "train"),
                          header=("image", "label", "split"))
    splits = load_splits(str(photos), 32, val_split=0.25, test_split=0.5, labels=str(labels))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)


def test_the_delimiter_is_sniffed_when_the_extension_does_not_say(photos, tmp_path):
    labels = write_labels(tmp_path / "labels.txt", photos, listing(photos), sep=";")
    assert load_splits(str(photos), 32, labels=str(labels)).class_names == ["cat", "dog", "zebra"]
    semicolons = write_labels(tmp_path / "excel.csv", photos, listing(photos), sep=";")  # a .csv of semicolons
    assert len(load_splits(str(photos), 32, labels=str(semicolons)).train) == 24


BAD_ROWS = [  # (the file's lines after the header image,label[,split]; its line named; what the one line says)
    (["class_0/img_000.png,cat", "class_0/nope.png,cat"], 3, "image class_0/nope.png not found"),
    (["class_0/img_000.png,cat", "class_0/img_001.png,  "], 3, "empty label for class_0/img_001.png"),
    (["class_0/img_000.png,cat,train", "class_0/img_001.png,cat,holdout"], 3, "unknown split holdout"),
    (["class_0/img_000.png,cat,train", "class_0/img_001.png,cat,"], 3, "unknown split (empty)"),
    (["class_0/img_000.png,cat", ",dog"], 3, "no image path"),
    (["class_0/img_000.png,cat", "class_0/img_001.png,cat,extra"], 3, "3 field(s) where the header names 2"),
    (["class_0/img_000.png,cat", "./class_0/img_000.png,dog"], 3, "listed already, on line 2"),
]


@pytest.mark.parametrize("lines, line, says", BAD_ROWS)
def test_every_bad_row_is_one_line_naming_it_and_nothing_is_written(photos, tmp_path, capsys, lines, line, says):
    header = "image,label,split" if "split" in says else "image,label"
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join([header, *lines]) + "\n")
    before = snapshot(tmp_path)
    result = cnnlab_here(capsys, "train", "--model", "conv", "--data", photos, "--labels", labels,
                         "--out", tmp_path / "runs", "--device", "cpu")
    assert_one_line_error(result, says)
    assert f"labels.csv:{line}:" in result.stderr
    assert snapshot(tmp_path) == before  # no run folder, no cache entry


@pytest.mark.parametrize("text, says", [
    ("picture,label\nclass_0/img_000.png,cat\n", "labels.csv:1: the header has no image column"),
    ("image,class\nclass_0/img_000.png,cat\n", "labels.csv:1: the header has no label column"),
    ("", "is empty"),
    ("image,label\n\n", "lists no images"),
    ("image,label\nclass_0/img_000.png,cat\nclass_0/img_001.png,cat\n", "has only one class (cat)"),
    ("image,label,split\nclass_0/img_000.png,cat,test\nclass_1/img_000.png,dog,val\n", "no readable image of split "
     "train"),
    (None, "does not exist"),
])
def test_bad_labels_files_are_one_line_errors(photos, tmp_path, capsys, text, says):
    labels = tmp_path / "labels.csv"
    if text is not None:
        labels.write_text(text)
    result = cnnlab_here(capsys, "train", "--model", "conv", "--data", photos, "--labels", labels,
                         "--out", tmp_path / "runs", "--device", "cpu")
    assert_one_line_error(result, says)
    assert not (tmp_path / "runs").exists()


def test_study_takes_labels_for_every_run(tmp_path):
    from cnnlab.cli_parser import build_parser
    from cnnlab.study import study_configs
    args = build_parser().parse_args(["study", "cifar10", "--data", "d", "--labels", "l.csv"])
    assert args.labels == "l.csv"
    assert [cfg.labels for cfg in study_configs("d", "runs", 0.1, 0, ("conv", "dropout"), labels="l.csv")] == \
        ["l.csv", "l.csv"]


def test_labels_beside_cifar10_are_refused(tmp_path):
    with pytest.raises(CnnlabError, match="--labels lists image files: pass --data FOLDER"):
        load_splits("cifar10", 32, labels=str(tmp_path / "x.csv"))


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_each_name_of_the_validation_folder_is_the_validation_split(tmp_path, val_name):
    make_folder(tmp_path / "d" / "train", classes=2, per_class=8)
    make_folder(tmp_path / "d" / val_name, classes=2, per_class=3, seed=1)
    make_folder(tmp_path / "d" / "test", classes=2, per_class=2, seed=2)
    splits = load_splits(str(tmp_path / "d"), 32, val_split=0.5, test_split=0.5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 6, 4)
    assert all(f"/{val_name}/" in f for f in splits.val.files)


def test_two_validation_folders_are_refused(tmp_path):
    for part in ("train", "val", "validation"):
        make_folder(tmp_path / "d" / part, classes=2, per_class=3)
    with pytest.raises(CnnlabError, match="both val/ and validation/ beside train/; keep one"):
        load_splits(str(tmp_path / "d"), 32)


def test_the_image_cache_keys_on_the_files_a_labels_file_lists(photos, tmp_path, private_cache):
    labels = write_labels(tmp_path / "labels.csv", photos, listing(photos))
    first, _, info = load_labelled(labels, photos, 32)
    assert not info["cache_hit"] and len(list(private_cache.glob("images-*.npy"))) == 1
    again, _, info = load_labelled(labels, photos, 32)
    assert info["cache_hit"] and torch.equal(first["train"].images, again["train"].images)
    shutil.copy(photos / "class_1" / "img_000.png", photos / "class_0" / "img_000.png")  # a file changes
    changed, _, info = load_labelled(labels, photos, 32)
    assert not info["cache_hit"]
    index = changed["train"].files.index(str((photos / "class_0" / "img_000.png").resolve()))
    assert torch.equal(changed["train"].images[index], again["train"].images[10])  # class_1's first, as decoded
    relabelled = write_labels(tmp_path / "other.csv", photos, [(p, "x" + label) for p, label in listing(photos)])
    relabelled_sets, classes, _ = load_labelled(relabelled, photos, 32)
    assert classes == ["xcat", "xdog", "xzebra"] and torch.equal(relabelled_sets["train"].images, changed["train"].images)


def test_a_run_record_without_the_new_settings_loads_with_their_defaults():
    for config in (TrainConfig, TransferConfig):
        record = {k: v for k, v in vars(config(data="d")).items() if k not in ("labels", "class_weights", "sampler")}
        loaded = from_record(config, json.loads(json.dumps(record, default=vars)))
        assert (loaded.labels, loaded.class_weights, loaded.sampler) == (None, "none", "shuffle")


def _skewed(root):
    """3 classes of 24, 8 and 4 images: a split worth balancing."""
    for c, n in enumerate((24, 8, 4)):
        make_folder(root / f"part{c}", classes=3, per_class=n, seed=c)
        (root / f"part{c}" / f"class_{c}").rename(root / f"class_{c}")
        shutil.rmtree(root / f"part{c}")
    return root


def test_a_labelled_balanced_run_resumes_bit_for_bit_and_evaluates_with_labels(tmp_path, capsys):
    data = _skewed(tmp_path / "data")
    labels = write_labels(tmp_path / "labels.csv", data, listing(data, split=lambda i: "test" if i < 2 else "train"),
                          header=("image", "label", "split"))
    args = ["train", "--model", "dropout", "--data", data, "--labels", labels, "--class-weights", "balanced",
            "--sampler", "balanced", "--augment", "--epochs", 16, "--batch-size", 4, "--threads", 1, "--device", "cpu",
            "--no-tensorboard", "--out", tmp_path / "runs"]
    reference = cnnlab(*args, "--name", "ref")
    assert reference.returncode == 0, reference.stderr
    proc = start(args + ["--name", "run"])
    run = tmp_path / "runs" / "run"
    wait_for_epochs(run, 3, proc)
    proc.kill()
    proc.wait()
    record = json.loads((run / "config.json").read_text())
    assert (record["labels"], record["class_weights"], record["sampler"]) == (str(labels), "balanced", "balanced")
    assert record["split_digests"]["test"]["images"] == 6
    text = labels.read_text()
    labels.write_text(text.replace(",dog,", ",cat,", 1))  # one test image relabelled: refused
    refused = cnnlab_here(capsys, "resume", run)  # refused before training: in this process
    assert_one_line_error(refused, "its test split's files or their classes differ")
    labels.write_text(text)
    resumed = cnnlab("resume", run)
    assert resumed.returncode == 0, resumed.stderr
    same_run(tmp_path / "runs" / "ref", run)
    scored = cnnlab_here(capsys, "evaluate", run, "--data", data, "--labels", labels, "--json")
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    metrics = json.loads((run / "metrics.json").read_text())
    assert result["images"] == 6 and "its test rows" in result["data"]  # the file's test rows: the run's test split
    assert result["confusion_matrix"] == metrics["confusion_matrix"]
    assert result["balanced_accuracy"] == pytest.approx(metrics["test_balanced_accuracy"])


def test_evaluate_refuses_a_label_the_run_does_not_know(trained_run, tmp_path, capsys):
    labels = write_labels(tmp_path / "l.csv", trained_run.data, [("class_0/img_000.png", "class_0"),
                                                                  ("class_1/img_000.png", "horse")])
    result = cnnlab_here(capsys, "evaluate", trained_run.dir, "--data", trained_run.data, "--labels", labels)
    assert_one_line_error(result, "l.csv:3: label horse is not one of the run's classes (class_0, class_1, class_2)")
    every = write_labels(tmp_path / "every.csv", trained_run.data, [("class_0/img_000.png", "class_0")])
    result = cnnlab_here(capsys, "evaluate", trained_run.dir, "--data", trained_run.data, "--labels", every, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["images"] == 1  # one class is enough to score
