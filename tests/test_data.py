import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data import load_folder, load_splits, stratified_split
from cnnlab.preprocessing import CIFAR10
from cnnlab.errors import CnnlabError
from conftest import make_folder


def test_stratified_split_sizes_and_class_balance():
    labels = torch.arange(4).repeat_interleave(50)
    train, val, test = stratified_split(labels, 0.2, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (140, 40, 20)
    for part, per_class in ((train, 35), (val, 10), (test, 5)):
        assert torch.bincount(labels[part], minlength=4).tolist() == [per_class] * 4
    everything = torch.cat([train, val, test])
    assert sorted(everything.tolist()) == list(range(200))


def test_split_is_fixed_by_the_seed():
    labels = torch.arange(3).repeat_interleave(30)
    a = stratified_split(labels, 0.2, 0.2, seed=7)
    b = stratified_split(labels, 0.2, 0.2, seed=7)
    c = stratified_split(labels, 0.2, 0.2, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])


def test_load_splits_from_a_class_folder(tiny_folder):
    splits = load_splits(str(tiny_folder), 32, val_split=0.2, test_split=0.2, seed=0)
    assert splits.class_names == ["class_0", "class_1", "class_2"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (36, 12, 12)
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(splits.test.labels).tolist() == [4, 4, 4]
    assert not set(splits.train.files) & set(splits.test.files)


def test_given_train_and_test_subfolders_are_honoured(tmp_path):
    make_folder(tmp_path / "d" / "train", per_class=10)
    make_folder(tmp_path / "d" / "test", per_class=4, seed=1)
    splits = load_splits(str(tmp_path / "d"), 32, val_split=0.2, test_split=0.5, seed=0)
    assert len(splits.test) == 12  # the given test folder, not carved
    assert (len(splits.train), len(splits.val)) == (24, 6)
    assert splits.info["given_splits"] == ["test", "train"]
    every = load_splits(str(tmp_path / "d"), 32, val_split=0, test_split=0.5, seed=0)  # --val-split 0
    assert (len(every.train), len(every.val), len(every.test)) == (30, 0, 12)
    assert every.test.files == splits.test.files


def test_every_split_gets_the_same_pixels_for_the_same_file(tmp_path):
    make_folder(tmp_path / "d" / "train", per_class=6)
    make_folder(tmp_path / "d" / "test", per_class=6)  # same seed: identical image files
    splits = load_splits(str(tmp_path / "d"), 32, val_split=0.3, test_split=0.3, seed=0)
    name = os.path.basename(splits.test.files[0])
    cls = os.path.basename(os.path.dirname(splits.test.files[0]))
    in_train = [i for i, f in enumerate(splits.train.files) if f.endswith(f"{cls}/{name}")]
    in_val = [i for i, f in enumerate(splits.val.files) if f.endswith(f"{cls}/{name}")]
    twin = splits.train.images[in_train[0]] if in_train else splits.val.images[in_val[0]]
    assert torch.equal(twin, splits.test.images[0])
    direct = np.asarray(Image.open(splits.test.files[0]).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(splits.test.images[0], torch.from_numpy(direct.copy()))
    a, b = CIFAR10(twin[None]), CIFAR10(splits.test.images[:1])
    assert torch.equal(a, b)


def test_cache_is_reused_and_invalidated_when_a_file_changes(tiny_folder, private_cache):
    first, _, info1 = load_folder(tiny_folder, 32)
    assert not info1["cache_hit"] and any(private_cache.glob("images-*.npy"))
    second, _, info2 = load_folder(tiny_folder, 32)
    assert info2["cache_hit"] and torch.equal(first.images, second.images)
    target = tiny_folder / "class_1" / "img_000.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    third, _, info3 = load_folder(tiny_folder, 32)
    assert not info3["cache_hit"]
    index = third.files.index(str(target.resolve()))
    assert third.images[index].sum() == 0
    _, _, other_size = load_folder(tiny_folder, 16)
    assert not other_size["cache_hit"]


def test_images_are_resized_and_odd_modes_converted(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=3, size=40)
    Image.new("L", (20, 30), 128).save(root / "class_0" / "gray.png")
    Image.new("RGBA", (50, 50), (10, 20, 30, 255)).save(root / "class_1" / "rgba.png")
    images, _, _ = load_folder(root, 24)
    assert images.images.shape == (8, 3, 24, 24)
    gray = images.images[images.files.index(str((root / "class_0" / "gray.png").resolve()))]
    assert gray.min() == gray.max() == 128


def test_unreadable_files_are_skipped_with_a_warning(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=3)
    (root / "class_0" / "broken.jpg").write_bytes(b"not an image")
    (root / "class_1" / "empty.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        images, _, info = load_folder(root, 32)
    assert len(images) == 6 and len(info["skipped"]) == 2


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no class subfolders"),
    (lambda p: make_folder(p / "one", classes=1), "only one class"),
])
def test_bad_folders_are_one_line_errors(tmp_path, setup, message):
    with pytest.raises(CnnlabError, match=message):
        load_splits(str(setup(tmp_path)), 32)


def test_class_folder_without_images_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=2)
    (root / "class_9").mkdir()
    with pytest.raises(CnnlabError, match="class_9 has no images"):
        load_splits(str(root), 32)


def test_cifar10_offline_is_a_one_line_error_naming_the_way_out(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.delenv("CNNLAB_DATA", raising=False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(CnnlabError, match="could not be downloaded.*--data.*CNNLAB_DATA") as info:
        load_splits("cifar10", 32)
    assert "\n" not in str(info.value)


def test_cifar10_comes_from_cnnlab_data_when_present(tmp_path, monkeypatch):
    make_folder(tmp_path / "root" / "cifar10", classes=2, per_class=10)
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "root"))
    splits = load_splits("cifar10", 32, val_split=0.2, test_split=0.2)
    assert splits.class_names == ["class_0", "class_1"] and len(splits.train) == 12


def test_cifar10_in_torchvision_format_gives_the_official_test_split(monkeypatch, private_cache):
    import torchvision

    class FakeCIFAR10:
        classes = ["a", "b"]

        def __init__(self, root, train, download):
            n = 20 if train else 6
            self.data = np.full((n, 32, 32, 3), 7 if train else 9, np.uint8)
            self.targets = [i % 2 for i in range(n)]
    monkeypatch.delenv("CNNLAB_DATA", raising=False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    splits = load_splits("cifar10", 32, val_split=0.2, test_split=0.3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 6)
    assert int(splits.test.images.float().mean()) == 9 and splits.train.images.shape[1:] == (3, 32, 32)


def test_file_and_class_names_that_are_not_utf8_are_read_and_cached(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=3)
    os.rename(os.fsencode(root / "class_0" / "img_000.png"), os.fsencode(root / "class_0") + b"/caf\xe9.png")
    os.rename(os.fsencode(root / "class_1"), os.fsencode(root) + b"/chien-\xff")
    images, classes, info = load_folder(root, 32)
    assert len(images) == 6 and os.fsdecode(b"chien-\xff") in classes and not info["cache_hit"]
    again, _, info = load_folder(root, 32)
    assert info["cache_hit"] and torch.equal(again.images, images.images)


def test_a_class_whose_every_file_is_unreadable_is_an_error_naming_it(tmp_path):
    root = make_folder(tmp_path / "d", classes=3, per_class=3)
    for image in (root / "class_1").iterdir():
        image.write_bytes(b"not an image")
    for _ in range(2):  # the first time decoding, the second from the cache
        with pytest.raises(CnnlabError, match="class folder .*class_1 has no readable image"):
            load_splits(str(root), 32)


def test_a_class_left_without_training_images_by_the_splits_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=10)
    for image in sorted((root / "class_1").iterdir())[2:]:
        image.unlink()
    with pytest.raises(CnnlabError, match="class class_1 has no training images"):
        load_splits(str(root), 32, val_split=0.4, test_split=0.4)


def test_a_data_folder_that_is_a_pipe_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(CnnlabError, match="is not a folder"):
        load_splits(str(tmp_path / "pipe"), 32)


def test_images_to_predict_are_read_a_batch_at_a_time(tmp_path):
    from cnnlab.images import image_batches, image_paths
    root = make_folder(tmp_path / "d", classes=2, per_class=5)
    (root / "class_1" / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        batches = [(len(images), len(paths)) for images, paths in image_batches(image_paths([str(root)]), 16, 4)]
    assert batches == [(4, 4), (3, 3), (3, 3)]  # 11 files, 4 at a time: the broken one leaves its batch 3
