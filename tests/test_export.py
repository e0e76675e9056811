"""cnnlab export: the ONNX file agrees with PyTorch, carries its preprocessing and class names, and
predict runs it through onnxruntime with the same output as the run directory."""
import json
import shutil
from types import SimpleNamespace

import pytest

from conftest import assert_one_line_error, cnnlab, make_folder

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx onnxruntime onnxscript)")


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory):
    """A transfer run (efficientnet_lite0, gap head) and the 2 classes of 12 photos it was trained on;
    the pool-bn run is the shared ``trained_run``."""
    root = tmp_path_factory.mktemp("export")
    pets = make_folder(root / "pets", classes=2, per_class=12, size=48)
    result = cnnlab("transfer", "--data", pets, "--backbone", "efficientnet_lite0", "--head", "gap", "--epochs", "1",
                    "--batch-size", "4", "--name", "lite", "--out", root / "runs", "--threads", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(dir=root / "runs" / "lite", data=pets)


@pytest.mark.parametrize("name, images", [("pool-bn", "class_1"), ("lite", "class_0")])
def test_an_exported_run_predicts_as_the_run_does(request, tmp_path, name, images):
    run = request.getfixturevalue({"pool-bn": "trained_run", "lite": "lite_run"}[name])
    result = cnnlab("export", run.dir, "-o", tmp_path / "model.onnx")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "model.onnx")
    assert "of the run's test images" in result.stdout and "top-1 agreement 100.00%" in result.stdout
    graph = onnx.load(tmp_path / "model.onnx")
    meta = {p.key: p.value for p in graph.metadata_props}
    config = json.loads((run.dir / "config.json").read_text())
    assert json.loads(meta["class_names"]) == config["class_names"] and meta["cnnlab_version"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch
    via_onnx, via_run = (json.loads(cnnlab("predict", run.data / images, "--model", model, "--json", "--top", "2").stdout)
                         for model in (tmp_path / "model.onnx", run.dir))
    assert len(via_onnx["predictions"]) == (12 if name == "lite" else 20)
    for a, b in zip(via_onnx["predictions"], via_run["predictions"]):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-4)


def test_export_writes_model_onnx_in_the_run_by_default(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    result = cnnlab("export", run)
    assert result.returncode == 0, result.stderr
    assert (run / "model.onnx").stat().st_size > 10_000


def test_export_bad_inputs_are_one_line(trained_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained_run.dir, unfinished)
    (unfinished / "metrics.json").unlink()
    assert_one_line_error(cnnlab("export", unfinished), "not a finished run")
    assert_one_line_error(cnnlab("export", trained_run.data), "not a run directory")
    assert_one_line_error(cnnlab("export", trained_run.dir, "--format", "tflite"), "unknown --format")
    assert_one_line_error(cnnlab("export", trained_run.dir, "-o", tmp_path / "missing" / "m.onnx"),
                          "cannot write")
    (tmp_path / "not.onnx").write_bytes(b"garbage")
    assert_one_line_error(cnnlab("predict", trained_run.data / "class_0", "--model", tmp_path / "not.onnx"),
                          "not a model exported by `cnnlab export`")


def test_export_never_replaces_a_file_the_run_needs(trained_run, tmp_path):
    from cnnlab.errors import CnnlabError
    from cnnlab.export import _checked_output
    run = trained_run.dir
    for name in sorted(p.name for p in run.iterdir() if p.is_file() and p.suffix != ".onnx"):
        with pytest.raises(CnnlabError, match="is one of the run's own files"):
            _checked_output(run, run / name)
    for name in ("model.pt", "weights.bin", "model"):
        with pytest.raises(CnnlabError, match="does not end in .onnx"):
            _checked_output(run, tmp_path / name)
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(CnnlabError, match="is not a plain file"):
        _checked_output(run, tmp_path / "folder.onnx")
    with pytest.raises(CnnlabError, match="longer than a file name may be"):
        _checked_output(run, tmp_path / ("m" * 260 + ".onnx"))
    assert _checked_output(run, None) == run / "model.onnx"
    assert _checked_output(run, tmp_path / "x.ONNX") == tmp_path / "x.ONNX"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_an_export_stopped_midway_leaves_no_temporary_file(tmp_path, monkeypatch, stop):
    import torch

    from cnnlab.export import _write_onnx

    def half_then_stop(model, args, f, **kwargs):
        open(f, "wb").write(b"half an onnx file")
        raise stop("stopped")
    monkeypatch.setattr(torch.onnx, "export", half_then_stop)
    with pytest.raises(stop):
        _write_onnx(torch.nn.Identity(), torch.zeros(2, 3, 8, 8), tmp_path / "model.onnx", {})
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_model_runs_a_batch_at_a_time():
    import numpy as np
    import torch

    from cnnlab.saved_model import OnnxModel
    seen = []

    class Session:
        def run(self, outputs, feeds):
            seen.append(len(feeds["pixels"]))
            return [np.zeros((len(feeds["pixels"]), 2), np.float32)]
    model = OnnxModel.__new__(OnnxModel)
    model.session, model.class_names = Session(), ["a", "b"]
    assert model.probabilities(torch.zeros(70, 3, 8, 8, dtype=torch.uint8)).shape == (70, 2)
    assert seen == [32, 32, 6]


def test_a_transfer_run_exports_to_int8_and_predicts(lite_run, tmp_path):
    """EfficientNet-Lite0 (depthwise convolutions, ReLU6, residual adds, a single-sigmoid head for 2
    classes): quantized, scored against the float file on the run's test split, and run by predict."""
    from cnnlab.predict import predict
    result = cnnlab("export", lite_run.dir, "--int8", "-o", tmp_path / "lite-int8.onnx")
    assert result.returncode == 0, result.stderr
    assert "int8: static QDQ" in result.stdout and "top-1 agreement" in result.stdout
    graph = onnx.load(tmp_path / "lite-int8.onnx")
    kinds = [n.op_type for n in graph.graph.node]
    assert kinds.count("DequantizeLinear") > 50  # every convolution's weights and activations
    assert [n.op_type for n in graph.graph.node if "pixels" in n.input] == ["Mul"]  # the preprocessing stays float
    via_int8, via_run = (predict([str(lite_run.data / "class_0")], str(m), top=2)
                         for m in (tmp_path / "lite-int8.onnx", lite_run.dir))
    for a, b in zip(via_int8, via_run):
        pa, pb = ({t["class"]: t["probability"] for t in r["top"]} for r in (a, b))
        assert pa == pytest.approx(pb, abs=0.1)
