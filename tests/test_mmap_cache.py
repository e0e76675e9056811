"""The decoded images are read memory-mapped from the image cache (folders.py, cache.py): the
training tensor is the cache file's pages, not a copy; a split is an entry of its own; damaged
entries are still found and rebuilt; without a usable cache the images are held in memory; and
decoding shows its progress when it takes long."""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab import cache, folders, progress
from cnnlab.data import load_folder, load_splits
from conftest import make_folder


def mapping_of(tensor: torch.Tensor) -> tuple[str, str]:
    """(permissions, path) of the mapping of this process that holds ``tensor``'s first byte."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[1], fields[5] if len(fields) > 5 else ""
    raise AssertionError("no mapping holds the tensor")


def rss_anon() -> int:
    return int(re.search(r"RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data", classes=3, per_class=20)


def test_every_split_is_mapped_from_its_own_cache_entry_and_never_written_back(folder, private_cache):
    whole, _, _ = load_folder(folder, 32)
    assert whole.entry.name.startswith("images-") and whole.entry.parent == private_cache
    assert mapping_of(whole.images) == ("rw-p", str(whole.entry))  # private: a write stays in this process
    splits = load_splits(str(folder), 32, 0.2, 0.2, seed=3)
    for part in (splits.train, splits.val, splits.test):
        assert part.entry.name.startswith("rows-") and mapping_of(part.images)[1] == str(part.entry)
        assert part.images.is_contiguous()
        rows = torch.tensor([whole.files.index(f) for f in part.files])
        assert torch.equal(part.images, whole.images[rows]) and torch.equal(part.labels, whole.labels[rows])
    on_cpu = splits.train.to("cpu")
    assert on_cpu.images is splits.train.images and on_cpu.entry == splits.train.entry  # no copy
    sealed = splits.train.entry.read_bytes()
    splits.train.images[0] += 1  # copy-on-write: this process's page only
    assert splits.train.entry.read_bytes() == sealed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_splits(str(folder), 32, 0.2, 0.2, seed=3)  # every entry found whole, none written again
    assert again.info["cache_hit"] and torch.equal(again.train.images[1:], splits.train.images[1:])
    assert sorted(p.name for p in private_cache.glob("*.npy")) == sorted(
        [whole.entry.name] + [getattr(splits, n).entry.name for n in ("train", "val", "test")])


def test_a_split_that_is_every_image_in_order_is_the_same_mapping(tmp_path, private_cache):
    root = tmp_path / "given"
    make_folder(root / "train", classes=2, per_class=10)
    make_folder(root / "val", classes=2, per_class=4, seed=1)
    make_folder(root / "test", classes=2, per_class=4, seed=2)
    splits = load_splits(str(root), 32)
    assert all(getattr(splits, n).entry.name.startswith("images-") for n in ("train", "val", "test"))
    assert not list(private_cache.glob("rows-*"))


def test_mapped_images_do_not_grow_anonymous_memory(tmp_path):
    rows, shape = 1024, (3, 128, 128)  # 48 MiB
    entry = tmp_path / "images-synthetic.npy"
    with cache.array_entry(entry, shape) as out:
        for start in range(0, rows, 128):
            out.append(np.full((128, *shape), start // 128, np.uint8))
    before = rss_anon()
    images = torch.from_numpy(cache.open_array(entry, (rows, *shape)))
    assert int(images.view(-1)[::4096].sum()) == sum(range(8)) * 128 * 3 * 128 * 128 // 4096
    index = torch.randperm(rows, generator=torch.Generator().manual_seed(0))[: rows * 3 // 4]
    train, train_entry = folders.take_rows(images, index, entry)
    assert train_entry.name.startswith("rows-synthetic-") and torch.equal(train[:5], images[index[:5]])
    assert int(train.view(-1)[::4096].sum()) > 0  # every page read
    data = images.numel() + train.numel()
    assert rss_anon() - before < data / 4, f"{(rss_anon() - before) / 2**20:.0f} MiB anonymous for " \
                                           f"{data / 2**20:.0f} MiB of images"


@pytest.mark.parametrize("which", ["images-", "rows-"])
def test_a_damaged_entry_is_found_and_rebuilt_with_one_warning(folder, private_cache, which):
    first = load_splits(str(folder), 32, 0.2, 0.2, seed=1)
    expected = {name: getattr(first, name).images.clone() for name in ("train", "val", "test")}
    del first  # its mapping would show the damage written in place below (MAP_PRIVATE is no snapshot)
    target = min(private_cache.glob(f"{which}*.npy"), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF  # a pixel garbled: the header still reads, only the checksum can tell
    target.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="is damaged") as caught:
        again = load_splits(str(folder), 32, 0.2, 0.2, seed=1)
    assert len([w for w in caught if "damaged" in str(w.message)]) == 1
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(again, name).images, expected[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.check(target) is not None  # healed


def test_a_truncated_entry_is_rebuilt_not_mapped(folder, private_cache):
    first, _, _ = load_folder(folder, 32)
    expected = first.images.clone()
    del first
    with open(next(private_cache.glob("images-*.npy")), "r+b") as f:
        f.truncate(1000)
    with pytest.warns(UserWarning, match="is damaged"):
        again, _, info = load_folder(folder, 32)
    assert not info["cache_hit"] and torch.equal(again.images, expected)


def test_without_a_usable_cache_folder_the_images_are_held_in_memory(folder, tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("CNNLAB_CACHE", str(blocked))
    with pytest.warns(UserWarning, match="could not write the image cache") as caught:
        splits = load_splits(str(folder), 32, 0.2, 0.2, seed=0)
    assert len(caught) == 1 and splits.train.entry is None and len(splits.train) == 36
    assert mapping_of(splits.train.images)[1] == "" or "rows-" not in mapping_of(splits.train.images)[1]


@pytest.fixture
def piped(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(progress, "in_notebook", lambda: False)


def test_slow_decoding_prints_progress_lines_when_piped(folder, piped, monkeypatch, capsys):
    clock = iter(range(0, 10_000, 3))  # every image takes 3 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    images, bad = folders.decode_images(paths, 32)
    assert images.shape == (60, 3, 32, 32) and bad == []
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 10 and all(line.startswith("decoding: ") for line in lines), lines
    assert re.fullmatch(r"decoding: 4/60 images \(7%\), 0\.3 images/s, about 168s left", lines[0]), lines[0]


def test_short_decoding_and_other_ranks_print_nothing(folder, piped, monkeypatch, capsys, private_cache):
    load_folder(folder, 32)
    assert capsys.readouterr().err == ""
    clock = iter(range(0, 10_000, 3))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(folders.distributed, "is_main", lambda: False)
    folders.decode_images(sorted(str(p) for p in folder.rglob("*.png")), 16)
    assert capsys.readouterr().err == ""
