"""Backbones, preprocessing, Keras weight conversion, transfer runs, feature cache, predict."""
import importlib.util
import json

import h5py
import numpy as np
import pytest
import torch

from cnnlab.backbones import (BACKBONES, CAFFE_PREPROCESSING, LITE_PREPROCESSING, TORCHVISION_PREPROCESSING, build,
                              for_extraction, get_backbone, keras_vgg_state)
from cnnlab.config import TransferConfig
from cnnlab.errors import CnnlabError
from cnnlab.preprocessing import Preprocessing
from cnnlab.transfer import transfer
from cnnlab.transfer_model import Head, TransferModel, freeze_base
from conftest import assert_one_line_error, cnnlab, make_folder


def test_torchvision_preprocessing_is_rgb_scaled_and_standardized():
    x = torch.tensor([10, 128, 250], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = TORCHVISION_PREPROCESSING(x)
    expected = [(10 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (250 / 255 - 0.406) / 0.225]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected), atol=1e-6)


def test_caffe_preprocessing_is_bgr_minus_mean_unscaled():
    x = torch.tensor([10, 128, 250], dtype=torch.uint8).view(1, 3, 1, 1)  # R, G, B
    out = CAFFE_PREPROCESSING(x)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([250 - 103.939, 128 - 116.779, 10 - 123.68]), atol=1e-4)


def test_each_weights_entry_carries_its_own_preprocessing():
    vgg = get_backbone("vgg19")
    assert vgg.weights_for("torchvision").preprocessing is TORCHVISION_PREPROCESSING
    assert vgg.weights_for("keras").preprocessing is CAFFE_PREPROCESSING
    lite = get_backbone("efficientnet_lite0").weights[0].preprocessing
    assert lite(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).flatten().tolist() == [-1.0, -1.0, -1.0]
    assert lite(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)).max().item() == 1.0
    resnet = get_backbone("resnet18").weights[0].preprocessing
    assert resnet.size == 224 and resnet.mean == pytest.approx((0.485, 0.456, 0.406))
    with pytest.raises(CnnlabError, match="unknown backbone 'vgg99'"):
        get_backbone("vgg99")
    assert set(BACKBONES) >= {"vgg19", "vgg16", "efficientnet_lite0"}


def write_keras_vgg19(path, channels=2, units=5, top=True):
    """A Keras-layout VGG19 h5 file with small layers and known values."""
    names = [f"block{b}_conv{i}" for b, n in zip(range(1, 6), (2, 2, 4, 4, 4)) for i in range(1, n + 1)]
    dense = ["fc1", "fc2", "predictions"] if top else []
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in ["input_1"] + names + ["flatten"] + dense]
        f.create_group("input_1").attrs["weight_names"] = []
        f.create_group("flatten").attrs["weight_names"] = []
        for k, name in enumerate(names):
            g = f.create_group(name)
            g.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            g[f"{name}/kernel:0"] = np.arange(3 * 3 * 2 * 4, dtype=np.float32).reshape(3, 3, 2, 4) + 1000 * k
            g[f"{name}/bias:0"] = np.arange(4, dtype=np.float32) + 1000 * k
        shapes = {"fc1": (49 * channels, units), "fc2": (units, units), "predictions": (units, 3)}
        for name in dense:
            g = f.create_group(name)
            g.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            rows, cols = shapes[name]
            g[f"{name}/kernel:0"] = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
            g[f"{name}/bias:0"] = np.arange(cols, dtype=np.float32)


def test_keras_h5_conversion_kernel_layout_and_flatten_order(tmp_path):
    write_keras_vgg19(tmp_path / "w.h5", channels=2, units=5)
    state = keras_vgg_state(tmp_path / "w.h5", "vgg19")
    k = np.arange(72, dtype=np.float32).reshape(3, 3, 2, 4)
    # conv: Keras (h, w, in, out) -> PyTorch (out, in, h, w)
    assert torch.equal(state["features.0.weight"], torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
    assert state["features.0.weight"][3, 1, 2, 0] == k[2, 0, 1, 3]
    assert state["features.34.bias"][0] == 15000  # the 16th conv layer
    # first dense: Keras rows are (h, w, c); PyTorch columns are (c, h, w)
    fc1 = state["classifier.0.weight"]
    assert fc1.shape == (5, 98)
    for c, h, w, o in [(0, 0, 0, 0), (1, 2, 3, 4), (1, 6, 6, 2), (0, 5, 1, 3)]:
        keras_row = (h * 7 + w) * 2 + c
        assert fc1[o, c * 49 + h * 7 + w] == keras_row * 5 + o
    # later dense layers: plain transpose
    assert torch.equal(state["classifier.3.weight"], torch.arange(25.).view(5, 5).T)
    assert state["classifier.6.weight"].shape == (3, 5)


def test_keras_notop_file_converts_the_base_only(tmp_path):
    write_keras_vgg19(tmp_path / "notop.h5", top=False)
    state = keras_vgg_state(tmp_path / "notop.h5", "vgg19")
    assert len(state) == 32 and not any(k.startswith("classifier") for k in state)


def test_fine_tuning_unfreezes_exactly_k_blocks():
    built = build("vgg19")
    model = TransferModel(built.features, Head("gap", 512, 7, 2))
    assert freeze_base(model, built.blocks, 0) == 0 and model.base_frozen
    assert freeze_base(model, built.blocks, 2) == 2
    trainable = [any(p.requires_grad for p in b.parameters()) for b in built.blocks]
    assert trainable == [False, False, False, True, True]
    model.train()
    assert all(not m.training for m in model.features.modules() if isinstance(m, torch.nn.BatchNorm2d))
    lite = build("efficientnet_lite0")
    lite_model = TransferModel(lite.features, Head("gap", 1280, 7, 2))
    assert freeze_base(lite_model, lite.blocks, 3) == 3
    lite_model.train()
    bns = [m for m in lite_model.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)  # statistics stay frozen while fine-tuning


@pytest.fixture(scope="module")
def vgg19_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg19-random.pth"
    torch.manual_seed(0)
    torch.save(build("vgg19").net.state_dict(), path)
    return path


@pytest.fixture
def pets(tmp_path):
    return make_folder(tmp_path / "pets", classes=2, per_class=8, size=48)


def test_vgg19_random_weights_from_a_file_frozen_run(vgg19_file, pets, tmp_path):
    cfg = TransferConfig(data=str(pets), backbone="vgg19", weights_file=str(vgg19_file), head="gap", epochs=2,
                         fine_tune_epochs=0, batch_size=4, val_split=0.25, test_split=0.25, out=str(tmp_path / "runs"), threads=2)
    run = transfer(cfg, log=lambda m: None)
    saved = torch.load(run / "model.pt", weights_only=True)
    original = torch.load(vgg19_file, weights_only=True)
    base = {k: v for k, v in saved.items() if k.startswith("features.")}
    assert len(base) == 32
    built = build("vgg19")  # map block-nested names back to torchvision's
    ours = [k for k in TransferModel(built.features, Head("gap", 512, 7, 2)).state_dict() if k.startswith("features.")]
    for our_key, their_key in zip(ours, [k for k in original if k.startswith("features.")]):
        assert torch.equal(saved[our_key], original[their_key]), our_key  # the frozen base is bit-identical
    torch.manual_seed(cfg.seed)
    fresh = Head("gap", 512, 7, 2)
    assert not torch.equal(saved["head.linear.weight"], fresh.linear.weight)  # the head trained
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert metrics["feature_cache"] == "written" and config["weights_variant"] == "torchvision"
    assert saved["head.linear.weight"].shape == (1, 512)  # two classes: one sigmoid unit
    if importlib.util.find_spec("onnxruntime"):  # the VGG run exports and agrees with itself in onnxruntime
        from cnnlab.export import export_run
        lines = []
        export_run(run, tmp_path / "vgg.onnx", log=lines.append)
        assert "of the run's test images" in lines[-1] and "top-1 agreement 100.00%" in lines[-1], lines
    for name in ("samples.png", "loss.png", "accuracy.png", "confusion_matrix.png", "history.csv"):
        assert (run / name).stat().st_size > 0
    scored = cnnlab("evaluate", run, "--data", pets, "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["images"] == 16


def test_feature_cache_is_reused_and_invalidated(pets, tmp_path):
    def run(name, precision="bf16"):
        cfg = TransferConfig(data=str(pets), backbone="efficientnet_lite0", head="gap", epochs=1, batch_size=4,
                             val_split=0.25, test_split=0.25, out=str(tmp_path / "runs"), name=name,
                             precision=precision)
        return json.loads((transfer(cfg, log=lambda m: None) / "metrics.json").read_text())["feature_cache"]
    assert run("a") == "written"
    assert run("b") == "hit"
    assert run("c", "fp32") == "written"  # float32 features are other features
    assert run("d", "fp32") == "hit"
    from PIL import Image
    Image.new("RGB", (48, 48), (1, 2, 3)).save(pets / "class_0" / "img_000.png")
    import os
    os.utime(pets / "class_0" / "img_000.png", ns=(1, 2))
    assert run("e") == "written"


def test_a_frozen_run_scores_its_test_split_from_cached_features_with_the_mirror_images_cached_too(
        pets, tmp_path, private_cache, monkeypatch):
    import importlib
    from cnnlab import features as features_module
    results = importlib.import_module("cnnlab.results")  # where a run's end tests it
    from cnnlab.data import load_splits
    from cnnlab.saved_model import load_model
    from cnnlab.inference import predict_logits, score_logits
    extracted, scored = [], []
    extract, through_model = features_module.extract_features, results.predict_logits

    def counted(net, images, *a, **k):  # the test's pass through the whole model (not the epochs' validation)
        if k.get("progress") == "testing":
            scored.append(len(images))
        return through_model(net, images, *a, **k)
    monkeypatch.setattr(features_module, "extract_features",
                        lambda base, images, *a, **k: extracted.append(len(images)) or extract(base, images, *a, **k))
    monkeypatch.setattr(results, "predict_logits", counted)

    def run(name, **settings):
        cfg = TransferConfig(data=str(pets), backbone="efficientnet_lite0", head="gap", epochs=1, batch_size=4,
                             val_split=0.25, test_split=0.25, out=str(tmp_path / "runs"), name=name,
                             precision="fp32", **{"fine_tune_epochs": 0, **settings})
        return transfer(cfg, log=lambda m: None)

    def metrics(run_dir):
        return json.loads((run_dir / "metrics.json").read_text())
    first = run("a")
    assert extracted == [8, 4, 4, 4] and scored == []  # train, val, test, the test's mirror images; no pass after
    model, config, prep = load_model(first)
    test = load_splits(str(pets), prep.size, 0.25, 0.25, 0).test
    whole = score_logits(predict_logits(model, test.images, prep, torch.device("cpu"), tta=1, precision="fp32"),
                         test.labels, config["class_names"])
    assert metrics(first)["test_loss"] == pytest.approx(whole["loss"], rel=2e-3)  # the cache keeps float16
    extracted.clear()
    again, plain = run("b"), run("c", tta=0)  # without test-time augmentation: the same cache, less of it
    assert extracted == [] and scored == []
    assert metrics(again)["feature_cache"] == metrics(plain)["feature_cache"] == "hit"
    assert metrics(again)["test_loss"] == metrics(first)["test_loss"] != metrics(plain)["test_loss"]
    # fine-tuning through the whole base changes it: its mirror images are not extracted
    tuned = run("d", fine_tune_epochs=1, fine_tune_cached=False)
    assert extracted == [] and scored == [4] and metrics(tuned)["feature_cache"] == "hit"


def test_fine_tuning_trains_the_top_block_on_cached_maps_and_scores_the_test_split_from_them(
        pets, tmp_path, private_cache, monkeypatch):
    """The default: the base below the unfrozen block runs once (train, val, test and the test's mirror
    images) into the cache; the block and the head train on those maps; the layers below stay as
    loaded; the test is scored from the maps, as the saved model scores the photos."""
    import importlib
    from cnnlab import features as features_module
    from cnnlab.backbones import pretrained
    from cnnlab.data import load_splits
    from cnnlab.inference import predict_logits, score_logits
    from cnnlab.runs import read_history
    from cnnlab.saved_model import load_model
    results = importlib.import_module("cnnlab.results")
    extracted, scored = [], []
    extract, through_model = features_module.extract_features, results.predict_logits
    monkeypatch.setattr(features_module, "extract_features",
                        lambda base, images, *a, **k: extracted.append(len(images)) or extract(base, images, *a, **k))
    monkeypatch.setattr(results, "predict_logits",
                        lambda net, images, *a, **k: (scored.append(len(images)) if k.get("progress") == "testing"
                                                      else None) or through_model(net, images, *a, **k))
    cfg = TransferConfig(data=str(pets), backbone="efficientnet_lite0", epochs=1, fine_tune_epochs=2, batch_size=4,
                         val_split=0.25, test_split=0.25, out=str(tmp_path / "runs"), precision="fp32")
    assert cfg.fine_tune_cached and cfg.unfreeze == 1
    lines = []
    run = transfer(cfg, log=lines.append)
    assert extracted == [8, 4, 4, 4] and scored == []  # one pass of the base below; the test from the cache
    assert any("on cached maps of the blocks below" in line for line in lines), lines
    (entry,) = [p for p in private_cache.glob("features-*.pt") if "-test-" not in p.name]
    # what the head conv takes: Lite0 at its default 260 px, a 9x9 map
    assert torch.load(entry, weights_only=True)["train"].shape == (8, 320, 9, 9)
    assert [r["phase"] for r in read_history(run / "history.csv")] == ["frozen", "fine-tune", "fine-tune"]
    model, config, prep = load_model(run)
    loaded = TransferModel(pretrained("efficientnet_lite0")[0].features, Head("gap", 1280, 7, 2)).state_dict()
    changed = {k for k, v in model.state_dict().items() if k.startswith("features.") and not torch.equal(v, loaded[k])}
    assert changed and all(k.startswith("features.head.") for k in changed), changed  # only the top block trained
    test = load_splits(str(pets), prep.size, 0.25, 0.25, 0).test
    whole = score_logits(predict_logits(model, test.images, prep, torch.device("cpu"), tta=1, precision="fp32"),
                         test.labels, config["class_names"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_loss"] == pytest.approx(whole["loss"], rel=2e-3)  # the cache keeps float16


def test_photo_variants_are_seeded_altered_copies():
    from cnnlab.data import photo_variants
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    a, again, other = photo_variants(images, 1), photo_variants(images, 1), photo_variants(images, 2)
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, again) and not torch.equal(a, other)
    assert all(not torch.equal(x, y) for x, y in zip(a, images))  # every copy altered (at least re-encoded)


def test_feature_copies_join_the_cache_as_more_training_rows(pets, tmp_path, private_cache):
    def run(copies):
        cfg = TransferConfig(data=str(pets), backbone="efficientnet_lite0", head="gap", epochs=1, batch_size=4,
                             val_split=0.25, test_split=0.25, out=str(tmp_path / "runs"), name=f"c{copies}",
                             feature_copies=copies)
        return transfer(cfg, log=lambda m: None)
    run(0)
    copied = run(2)
    entries = {len(torch.load(p, weights_only=True)["train"]): torch.load(p, weights_only=True)
               for p in private_cache.glob("features-*.pt") if "-test-" not in p.name}  # not the mirror images
    assert sorted(entries) == [8, 24]  # 8 training photos; with 2 copies each, 8 + 16 rows, in their own entry
    assert torch.equal(entries[24]["train"][:8], entries[8]["train"])  # the photos first, unchanged
    assert torch.equal(entries[24]["test"], entries[8]["test"])  # only training photos get copies
    assert json.loads((copied / "metrics.json").read_text())["test_size"] == 4
    assert json.loads((copied / "config.json").read_text())["feature_copies"] == 2


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_features_are_computed_in_the_asked_precision(precision, dtype):
    from cnnlab.features import Extraction, extract_features
    features = torch.nn.Conv2d(3, 4, 3)
    seen = set()
    features.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = extract_features(features, images, Extraction(Preprocessing(8), torch.device("cpu"), pool=True,
                                                        precision=precision, batch_size=4))
    assert seen == {dtype} and out.shape == (6, 4) and out.dtype == torch.float16


def test_a_signal_stops_feature_extraction_at_the_next_batch():
    from cnnlab.errors import RunInterrupted
    from cnnlab.features import Extraction, extract_features
    from cnnlab.interrupts import InterruptGuard
    features = torch.nn.Conv2d(3, 4, 3)
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    how = Extraction(Preprocessing(8), torch.device("cpu"), pool=True, batch_size=4)
    guard = InterruptGuard()
    out = extract_features(features, images, how, guard=guard)
    assert out.shape == (10, 4)
    guard.signum = 2  # as the guard's handler sets it on Ctrl-C
    with pytest.raises(RunInterrupted) as stop:
        extract_features(features, images, how, guard=guard)
    assert (stop.value.signum, stop.value.epoch, stop.value.batch, stop.value.batches) == (2, 0, 0, 3)


def test_fine_tuning_run_records_both_phases(pets, tmp_path):
    cfg = TransferConfig(data=str(pets), backbone="efficientnet_lite0", head="gap", epochs=2, fine_tune_epochs=1,
                         unfreeze=2, batch_size=4, val_split=0.25, test_split=0.25, out=str(tmp_path / "runs"))
    run = transfer(cfg, log=lambda m: None)
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 4 and history[-1].endswith("fine-tune") and history[1].endswith("frozen")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["unfrozen_blocks"] == 2 and metrics["epochs_run"] == 3


def test_predict_names_a_cat_in_chelsea_with_efficientnet_lite0(tmp_path):
    from PIL import Image
    from skimage import data
    Image.fromarray(data.chelsea()).save(tmp_path / "chelsea.png")
    Image.fromarray(data.chelsea()).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(data.chelsea()[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    result = cnnlab("predict", tmp_path, "--model", "efficientnet_lite0", "--top", "3", "--json")
    assert result.returncode == 0, result.stderr
    predictions = {p["image"].rsplit("/", 1)[-1]: p["top"] for p in json.loads(result.stdout)["predictions"]}
    assert set(predictions) == {"chelsea.png", "cmyk.jpg", "gray16.png"} and "broken.jpg" in result.stderr
    cats = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    assert predictions["chelsea.png"][0]["class"] in cats
    assert predictions["chelsea.png"][0]["probability"] > 0.5 and len(predictions["chelsea.png"]) == 3
    text = cnnlab("predict", tmp_path / "chelsea.png", "--model", "efficientnet_lite0").stdout
    assert "%  " in text and text.split(": ", 1)[1].split(" ")[0] in {w.split()[0] for w in cats}


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_extraction_copy_folds_batch_norm_and_padding_into_the_convolutions(name, size):
    features = build(name).features.eval()
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in features.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics as if trained
        for t, low, high in ((bn.running_mean, -1, 1), (bn.running_var, 0.3, 3), (bn.weight, 0.5, 1.5), (bn.bias, -1, 1)):
            t.data.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)
    pads = lambda m: sum(isinstance(p, torch.nn.ZeroPad2d) for p in m.modules())  # noqa: E731
    norms = lambda m: sum(isinstance(p, torch.nn.BatchNorm2d) for p in m.modules())  # noqa: E731
    before = (pads(features), norms(features))
    fast = for_extraction(features)
    x = torch.randn(2, 3, size, size, generator=generator)
    with torch.no_grad():
        assert torch.allclose(fast(x), features(x), atol=1e-4, rtol=1e-4)
    assert norms(fast) == 0 and (pads(features), norms(features)) == before and before[1] > 40
    assert 0 < pads(fast) < before[0] / 2  # only the stride-2 layers' lopsided 'same' padding is left
    vgg = build("vgg19").features
    assert for_extraction(vgg) is vgg  # no batch norm to fold


def test_scoring_a_transfer_model_runs_a_folded_copy_and_leaves_the_model_as_it_was(monkeypatch):
    from cnnlab import inference
    from cnnlab.backbones import TORCHVISION_PREPROCESSING
    built = build("efficientnet_lite0")
    model = TransferModel(built.features, Head("gap", built.channels, built.grid, 3)).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_var.data.uniform_(0.3, 3, generator=torch.Generator().manual_seed(1))
    norms = lambda m: sum(isinstance(p, torch.nn.BatchNorm2d) for p in m.modules())  # noqa: E731
    seen = []
    monkeypatch.setattr(inference, "augmented_logits", lambda net, x, tta: seen.append(norms(net)) or net(x).float())
    images = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    logits = inference.predict_logits(model, images, TORCHVISION_PREPROCESSING, torch.device("cpu"), precision="fp32")
    with torch.no_grad():
        direct = model(TORCHVISION_PREPROCESSING.on(torch.device("cpu"))(images).contiguous())
    assert seen and set(seen) == {0}  # every batch ran through a copy without batch norms
    assert norms(model) > 40 and torch.allclose(logits, direct, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_the_larger_efficientnet_lites_see_chelsea_at_their_own_size(tmp_path, name, size):
    from PIL import Image
    from skimage import data

    from cnnlab.predict import predict
    Image.fromarray(data.chelsea()).save(tmp_path / "chelsea.png")
    assert get_backbone(name).weights[0].preprocessing.size == size
    built = build(name)
    assert built.grid == -(-size // 32) and built.features(torch.zeros(1, 3, size, size)).shape == (1, 1280,
                                                                                                     built.grid, built.grid)
    (top,) = predict([str(tmp_path / "chelsea.png")], name, None, 1)
    assert top["top"][0]["class"] in {"tabby", "tiger cat", "Egyptian cat"}


def test_offline_without_weights_names_the_way_out(pets, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    result = cnnlab("transfer", "--data", pets, "--backbone", "vgg19", "--out", tmp_path / "runs")
    assert_one_line_error(result, "--weights")
    assert "efficientnet_lite0" in result.stderr and "torch-home" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_weights_file_for_another_architecture(pets, tmp_path):
    from cnnlab.backbones import find_weights_file
    lite = find_weights_file("efficientnet_lite0", get_backbone("efficientnet_lite0").weights[0], None)
    result = cnnlab("transfer", "--data", pets, "--backbone", "vgg19", "--weights", lite, "--out", tmp_path / "runs")
    assert_one_line_error(result, "does not fit vgg19 (missing keys: classifier")


def test_transfer_needs_two_classes(tmp_path):
    one = make_folder(tmp_path / "one", classes=1, per_class=3)
    result = cnnlab("transfer", "--data", one, "--backbone", "efficientnet_lite0", "--out", tmp_path / "runs")
    assert_one_line_error(result, "only one class")


def test_transfer_scores_with_the_mirror_image_by_default(pets, tmp_path):
    from cnnlab.data import load_splits
    from cnnlab.evaluate import evaluate_run
    from cnnlab.saved_model import load_model
    from cnnlab.inference import predict_logits, score_logits

    def run(**tta):
        cfg = TransferConfig(data=str(pets), backbone="efficientnet_lite0", head="gap", epochs=1, batch_size=4,
                             val_split=0.25, test_split=0.25, out=str(tmp_path / "runs"), precision="fp32", **tta)
        return transfer(cfg, log=lambda m: None)
    mirrored, plain = run(), run(tta=0)
    model, config, prep = load_model(mirrored)
    assert config["tta"] == 1 and json.loads((plain / "config.json").read_text())["tta"] == 0
    test = load_splits(str(pets), prep.size, 0.25, 0.25, 0).test
    cpu = torch.device("cpu")
    with_mirror, alone = (score_logits(predict_logits(model, test.images, prep, cpu, tta=t, precision="fp32"),
                                       test.labels, config["class_names"])["loss"] for t in (1, 0))
    assert with_mirror != pytest.approx(alone, rel=1e-4)  # the mirror image changes the score
    metrics = json.loads((mirrored / "metrics.json").read_text())
    assert metrics["test_loss"] == pytest.approx(with_mirror, rel=1e-4)
    assert evaluate_run(mirrored, pets)["loss"] != pytest.approx(evaluate_run(plain, pets)["loss"], rel=1e-4)
    assert_one_line_error(cnnlab("transfer", "--data", pets, "--backbone", "efficientnet_lite0", "--tta", "3"),
                          "--tta")


def test_a_transfer_run_recorded_before_tta_existed_is_one_line_asking_to_train_it_again():
    from dataclasses import asdict

    from cnnlab.config import from_record
    from cnnlab.errors import CnnlabError
    record = asdict(TransferConfig(data="pets"))
    assert from_record(TransferConfig, record).tta == 1
    assert from_record(TransferConfig, record).fine_tune_cached
    del record["fine_tune_cached"]  # recorded before it existed: fine-tuned through the whole base, as then
    assert not from_record(TransferConfig, record).fine_tune_cached
    del record["tta"]
    with pytest.raises(CnnlabError, match="config.json has no tta: an older cnnlab wrote it; train the run again"):
        from_record(TransferConfig, record)


def test_efficientnet_lite_built_for_another_input_size_pads_the_tensorflow_way_at_that_size():
    own, odd = build("efficientnet_lite0"), build("efficientnet_lite0", 97)
    # 'same' padding gives ceil(n / 2) at each of the five stride-2 convolutions: 97 -> 49 -> 25 -> 13 -> 7 -> 4;
    # the padding fixed for 224 would give 3
    assert odd.grid == 4 and odd.features.eval()(torch.zeros(1, 3, 97, 97)).shape == (1, 1280, 4, 4)
    assert own.features.eval()(torch.zeros(1, 3, 97, 97)).shape[-1] == 3
    assert build("efficientnet_lite0", 224).net.state_dict().keys() == own.net.state_dict().keys()
    assert build("vgg19", 256).grid == 8 and build("vgg19").grid == 7


def test_image_size_sets_the_input_the_base_sees_and_the_run_reads_back_at_it(pets, tmp_path):
    from cnnlab.evaluate import evaluate_run
    from cnnlab.saved_model import load_model

    def run(size):
        cfg = TransferConfig(data=str(pets), backbone="efficientnet_lite0", head="flatten", epochs=1, batch_size=4,
                             val_split=0.25, test_split=0.25, out=str(tmp_path / "runs"), precision="fp32",
                             image_size=size)
        return transfer(cfg, log=lambda m: None)
    run_dir = run(97)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preprocessing"]["size"] == 97 and config["feature_shape"] == [1280, 4, 4]
    assert json.loads((run_dir / "metrics.json").read_text())["feature_cache"] == "written"
    model, _, prep = load_model(run_dir)  # the flatten head fits only a base rebuilt at 97
    assert prep.size == 97 and model.head.linear.in_features == 1280 * 16
    # a base rebuilt at the run's own size, or the flatten head could not take its features
    assert evaluate_run(run_dir, pets)["images"] == sum(1 for f in pets.rglob("*") if f.is_file())
    default = json.loads((run(None) / "config.json").read_text())  # Lite0's default: 1.16x its weights' 224
    assert default["preprocessing"]["size"] == default["image_size"] == 260
    assert_one_line_error(cnnlab("transfer", "--data", pets, "--backbone", "efficientnet_lite0",
                                 "--image-size", "16"), "--image-size")


def test_transfer_sizes_are_the_lite_nets_fixres_sizes_and_every_other_backbones_own():
    from cnnlab.backbones import transfer_size
    assert [transfer_size(f"efficientnet_lite{i}") for i in range(3)] == [260, 280, 300]
    assert transfer_size("vgg19") == transfer_size("vgg19", "keras") == 224 and transfer_size("resnet18") == 224


def test_a_run_recorded_without_a_size_restarts_at_the_size_it_took(pets, tmp_path):
    from cnnlab.transfer import resume_transfer
    cfg = TransferConfig(data=str(pets), epochs=1, fine_tune_epochs=0, batch_size=4, val_split=0.25, test_split=0.25,
                         out=str(tmp_path / "runs"), name="old", tensorboard=False, threads=1, image_size=224)
    run_dir = transfer(cfg, log=lambda m: None)
    config_path = run_dir / "config.json"
    # as an older cnnlab wrote it: no size recorded, the weights' own 224 taken, then the default
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "image_size": None}))
    (run_dir / "metrics.json").unlink()  # stopped before the end
    resume_transfer(run_dir, log=lambda m: None)
    config = json.loads(config_path.read_text())
    assert config["image_size"] == config["preprocessing"]["size"] == 224 and (run_dir / "metrics.json").exists()


def _trained_lite(size: int):
    """EfficientNet-Lite0 built for ``size``, its batch-norm statistics as if trained."""
    features = build("efficientnet_lite0", size).features.eval()
    generator = torch.Generator().manual_seed(3)
    for bn in (m for m in features.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_var.data.uniform_(0.3, 3, generator=generator)
        bn.running_mean.data.uniform_(-1, 1, generator=generator)
    return features


def test_float32_extraction_on_a_cpu_runs_the_lite_base_in_onnxruntime_with_the_same_features():
    from cnnlab.onnx_extraction import OnnxBase, extraction_base
    from cnnlab.features import Extraction, extract_features
    features, cpu = _trained_lite(64), torch.device("cpu")
    base = extraction_base(features, 64, cpu, None)
    assert isinstance(base, OnnxBase)
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)  # batches of 2, 2 and 1
    for pool, view in ((True, None), (False, lambda x: x.flip(3))):
        how = Extraction(LITE_PREPROCESSING, cpu, pool, precision="fp32", batch_size=2)
        ours = extract_features(base, images, how, view)
        torchs = extract_features(for_extraction(features), images, how, view)
        assert ours.shape == torchs.shape and ours.shape[:2] == (5, 1280)
        assert torch.allclose(ours.float(), torchs.float(), atol=2e-3, rtol=2e-3)  # float16 in the cache


def test_onnxruntime_extraction_only_where_it_pays(monkeypatch):
    from cnnlab.onnx_extraction import OnnxBase, extraction_base
    features, cpu = _trained_lite(64), torch.device("cpu")
    assert not isinstance(extraction_base(features, 64, cpu, torch.bfloat16), OnnxBase)  # bfloat16: PyTorch's
    vgg = build("vgg19", 64).features
    assert extraction_base(vgg, 64, cpu, None) is vgg  # measured on EfficientNet-Lite only
    monkeypatch.setenv("CNNLAB_ONNXRUNTIME", "0")
    assert not isinstance(extraction_base(features, 64, cpu, None), OnnxBase)


def test_a_base_onnxruntime_cannot_take_is_extracted_by_pytorch_with_a_warning(monkeypatch):
    from cnnlab import onnx_extraction
    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator")
    monkeypatch.setattr(onnx_extraction.torch.onnx, "export", refuse)
    said = []
    base = onnx_extraction.extraction_base(_trained_lite(64), 64, torch.device("cpu"), None, said.append)
    assert not isinstance(base, onnx_extraction.OnnxBase) and sum(isinstance(m, torch.nn.BatchNorm2d)
                                                                     for m in base.modules()) == 0
    assert len(said) == 1 and "unsupported operator" in said[0] and "PyTorch" in said[0]
