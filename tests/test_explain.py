"""cnnlab explain: one Grad-CAM overlay PNG per readable image, from a run or a backbone."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, cnnlab, make_folder

pytest.importorskip("pytorch_grad_cam", reason="grad-cam is not installed (pip install grad-cam)")


def test_one_overlay_per_readable_image_and_a_warning_for_the_others(trained_run, tmp_path):
    run_dir, data = trained_run.dir, trained_run.data
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("img_000.png", "img_001.png"):
        (photos / name).write_bytes((data / "class_1" / name).read_bytes())
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    result = cnnlab("explain", photos, "--model", run_dir, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable" in result.stderr and "Traceback" not in result.stderr
    written = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in written] == ["img_000-gradcam.png", "img_001-gradcam.png"]
    assert result.stdout.split() == [str(p) for p in written]
    for path in written:
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 200


def test_the_overlay_is_the_class_map_blended_into_the_photo(trained_run):
    from cnnlab.explain import explainable, overlays
    from cnnlab.saved_model import load_model
    run_dir, data = trained_run.dir, trained_run.data
    model, _, prep = load_model(run_dir, torch.device("cpu"))
    images = torch.from_numpy(np.stack([np.asarray(Image.open(data / "class_0" / f"img_00{i}.png")).transpose(2, 0, 1)
                                        for i in range(3)]))
    before = [p.detach().clone() for p in model.parameters()]
    pictures, classes, probs = overlays(explainable(model), images, prep, classes=[2, 2, 2])
    assert pictures.shape == (3, 32, 32, 3) and pictures.dtype == np.uint8 and classes == [2, 2, 2]
    assert not np.array_equal(pictures, images.permute(0, 2, 3, 1).numpy())  # a heat map was blended in
    assert all(0 <= p <= 1 for p in probs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model itself is untouched
    _, top, _ = overlays(explainable(model), images, prep)
    assert top == model(prep(images)).argmax(1).tolist()


def test_two_photos_with_the_same_name_get_two_files(trained_run, tmp_path):
    run_dir, data = trained_run.dir, trained_run.data
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "0.png").write_bytes((data / "class_0" / "img_000.png").read_bytes())
    result = cnnlab("explain", tmp_path / "a", tmp_path / "b", "--model", run_dir, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a-0-gradcam.png", "b-0-gradcam.png"]


def test_explain_bad_inputs_are_one_line(trained_run, tmp_path):
    run_dir, data = trained_run.dir, trained_run.data
    image = data / "class_0" / "img_000.png"
    assert_one_line_error(cnnlab("explain", image, "--model", run_dir, "--class", "zebra"), "--class 'zebra'")
    assert_one_line_error(cnnlab("explain", tmp_path / "missing.png", "--model", run_dir), "does not exist")
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert_one_line_error(cnnlab("explain", image, "--model", tmp_path / "m.onnx"), "needs the PyTorch model")


def test_a_pretrained_backbone_explains_photos_with_its_imagenet_classes(tmp_path):
    photos = make_folder(tmp_path / "photos", classes=2, per_class=1, size=64)
    result = cnnlab("explain", photos, "--model", "efficientnet_lite0", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["class_0-img_000-gradcam.png",
                                                                        "class_1-img_000-gradcam.png"]


def test_a_long_file_name_is_explained_as_it_is_predicted(trained_run, tmp_path, capsys):
    from cnnlab.cli import main
    photos = tmp_path / "photos"
    photos.mkdir()
    long = photos / ("a" * 246 + ".png")  # 250 characters: STEM-gradcam.png would be 258
    long.write_bytes((trained_run.data / "class_1" / "img_000.png").read_bytes())
    odd = photos / "red\x1b[31m.png"
    odd.write_bytes(long.read_bytes())
    assert main(["predict", str(photos), "--model", str(trained_run.dir)]) == 0
    assert main(["explain", str(photos), "--model", str(trained_run.dir), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "red\\x1b[31m" in out
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(written) == 2 and all(len(n.encode()) <= 255 and n.endswith("-gradcam.png") for n in written)
    assert "red\\x1b[31m-gradcam.png" in written


def test_output_names_are_distinct_and_fit_the_file_system(tmp_path):
    from pathlib import Path

    from cnnlab.explain import _output_names
    paths = [Path("cat") / ("x" * 250 + ".jpg"), Path("dog") / ("x" * 250 + ".jpg"), Path("cat/0.jpg"),
             Path("dog/0.jpg"), Path("cat/0.jpg")]
    names = [p.name for p in _output_names(paths, tmp_path)]
    assert len(set(names)) == 5 and all(len(n.encode()) <= 255 for n in names)
    assert names[2:4] == ["cat-0-2-gradcam.png", "dog-0-gradcam.png"]
