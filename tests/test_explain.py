"""cnnlab explain: one Grad-CAM overlay PNG per readable image, from a run or a backbone."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_folder
from test_cli import assert_one_line_error, cnnlab

pytest.importorskip("pytorch_grad_cam", reason="grad-cam is not installed (pip install grad-cam)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data = make_folder(root / "data", per_class=20)
    result = cnnlab("train", "--preset", "pool-bn", "--data", data, "--epochs", "2", "--batch-size", "8",
                    "--threads", "1", "--device", "cpu", "--out", root / "runs", "--no-tensorboard")
    assert result.returncode == 0, result.stderr
    return root / "runs" / "pool-bn", data


def test_one_overlay_per_readable_image_and_a_warning_for_the_others(run, tmp_path):
    run_dir, data = run
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


def test_the_overlay_is_the_class_map_blended_into_the_photo(run):
    from cnnlab.evaluate import load_model
    from cnnlab.explain import explainable, overlays
    run_dir, data = run
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


def test_two_photos_with_the_same_name_get_two_files(run, tmp_path):
    run_dir, data = run
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "0.png").write_bytes((data / "class_0" / "img_000.png").read_bytes())
    result = cnnlab("explain", tmp_path / "a", tmp_path / "b", "--model", run_dir, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a-0-gradcam.png", "b-0-gradcam.png"]


def test_explain_bad_inputs_are_one_line(run, tmp_path):
    run_dir, data = run
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
