"""cnnlab export --int8: a quantized file (int8 weights per channel, uint8 activations, QDQ) whose
preprocessing and softmax stay float, scored against the float file on the run's test split before
it is written; a larger drop than --max-drop is a one-line refusal that leaves nothing behind; the
presets, the airbench nets and transfer runs (test_export.py) quantize, and predict runs the file."""
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import assert_one_line_error, cnnlab, cnnlab_here, make_folder

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx onnxruntime onnxscript)")

SCORES = re.compile(r"on the run's (\d+) test images: float32 accuracy ([\d.]+)%, int8 ([\d.]+)% "
                    r"\(drop (-?[\d.]+) points, --max-drop ([\d.]+)\), top-1 agreement ([\d.]+)%")


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """An airbench net (the `fast` preset: whitening, GELU, batch norms after pooling), one epoch."""
    root = tmp_path_factory.mktemp("int8")
    data = make_folder(root / "data", per_class=20)
    result = cnnlab("train", "--model", "fast", "--data", data, "--epochs", "1", "--batch-size", "8", "--threads", "1",
                    "--device", "cpu", "--out", root / "runs", "--name", "fast")
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(dir=root / "runs" / "fast", data=data)


def nodes(path):
    graph = onnx.load(path).graph
    return graph, {out: n for n in graph.node for out in n.output}


def int8_export(run, out):
    """``cnnlab export RUN --int8 -o OUT`` as a user runs it: (its output, its scores line)."""
    result = cnnlab("export", run.dir, "--int8", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    found = SCORES.search(result.stdout)
    assert found, result.stdout
    return SimpleNamespace(run=run, path=out, stdout=result.stdout, scores=found)


@pytest.fixture(scope="module")
def pool_bn_int8(trained_run, tmp_path_factory):
    return int8_export(trained_run, tmp_path_factory.mktemp("int8-pool-bn") / "m-int8.onnx")


@pytest.fixture(scope="module")
def fast_int8(fast_run, tmp_path_factory):
    return int8_export(fast_run, tmp_path_factory.mktemp("int8-fast") / "m-int8.onnx")


@pytest.mark.parametrize("name", ["pool_bn", "fast"])
def test_an_int8_export_is_quantized_and_scored_against_the_float_file(request, name):
    export = request.getfixturevalue(f"{name}_int8")
    run, found, path = export.run, export.scores, export.path
    config = json.loads((run.dir / "config.json").read_text())
    images, float_acc, int8_acc, drop = int(found[1]), float(found[2]), float(found[3]), float(found[4])
    assert images == config["data_info"]["test_size"]  # the run's whole test split
    assert drop == pytest.approx(float_acc - int8_acc, abs=0.011) and drop <= 1.0
    assert "of the run's test images: onnxruntime vs PyTorch" in export.stdout  # the float file checked first
    graph, producer = nodes(path)
    kinds = [n.op_type for n in graph.node]
    assert kinds.count("QuantizeLinear") >= 2 and kinds.count("DequantizeLinear") >= 4
    weights = {i.name: i for i in graph.initializer}
    # every convolution's weights are int8, one scale per output channel
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        dq = producer[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w, scale = weights[dq.input[0]], weights[dq.input[1]]
        assert w.data_type == onnx.TensorProto.INT8 and list(scale.dims) == [w.dims[0]]
    # the preprocessing takes the float pixels itself; a float classifier and softmax give the probabilities
    first = [n for n in graph.node if "pixels" in n.input]
    assert [n.op_type for n in first] == ["Mul"]
    assert producer["probabilities"].op_type == "Softmax"
    logits = producer[producer["probabilities"].input[0]]
    if logits.op_type == "Mul":  # airbench scales its logits
        logits = producer[logits.input[0]]
    assert logits.op_type == "Gemm" and weights[logits.input[1]].data_type == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta["class_names"]) == config["class_names"] and "uint8 activations" in meta["quantization"]
    assert path.stat().st_size < 0.5 * (run.dir / "model.pt").stat().st_size


def test_predict_runs_an_int8_file_close_to_the_run_itself(pool_bn_int8, trained_run):
    from cnnlab.predict import predict  # what `cnnlab predict --model FILE.onnx` prints (test_export runs the command)
    answers = [predict([str(trained_run.data)], str(model), top=3) for model in (trained_run.dir, pool_bn_int8.path)]
    a, b = ([{t["class"]: t["probability"] for t in p["top"]} for p in answer] for answer in answers)
    assert len(a) == len(b) == 60
    differences = [abs(x[c] - y[c]) for x, y in zip(a, b) for c in x]
    assert max(differences) < 0.1, max(differences)
    assert np.mean(differences) < 0.02
    assert sum(max(x, key=x.get) == max(y, key=y.get) for x, y in zip(a, b)) >= 57  # top-1 the same for 95%


def test_a_larger_drop_than_max_drop_writes_nothing(trained_run, tmp_path, capsys, monkeypatch):
    import cnnlab.export
    from cnnlab.quantize import compare
    out = tmp_path / "out"
    out.mkdir()

    def worse(float_probs, int8_probs, labels, thresholds):  # the real comparison, then 1.5 points lost on top
        scores = compare(float_probs, int8_probs, labels, thresholds)
        return {**scores, "int8_score": scores["int8_score"] - 0.015, "drop_points": scores["drop_points"] + 1.5}
    monkeypatch.setattr(cnnlab.export, "compare", worse)
    result = cnnlab_here(capsys, "export", trained_run.dir, "--int8", "-o", out / "m.onnx")
    assert_one_line_error(result, "more than --max-drop 1: nothing written")
    assert list(out.iterdir()) == []  # neither the file nor a temporary one
    result = cnnlab_here(capsys, "export", trained_run.dir, "--int8", "--max-drop", "2.5", "-o", out / "m.onnx")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["m.onnx"]


def test_int8_bad_inputs_are_one_line(trained_run, tmp_path, capsys):
    assert_one_line_error(cnnlab_here(capsys, "export", trained_run.dir, "--max-drop", "2"), "add --int8")
    assert_one_line_error(cnnlab_here(capsys, "export", trained_run.dir, "--int8", "--max-drop", "-1"),
                          "--max-drop must be at least 0")
    moved = shutil.copytree(trained_run.dir, tmp_path / "moved")
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "data": str(tmp_path / "gone")}))
    result = cnnlab_here(capsys, "export", moved, "--int8")
    assert_one_line_error(result, "--int8 calibrates on the run's training images")
    assert not (moved / "model-int8.onnx").exists()
    changed = shutil.copytree(trained_run.data, tmp_path / "changed")
    for image in sorted((changed / "class_0").iterdir())[:3]:
        image.unlink()
    (moved / "config.json").write_text(json.dumps({**config, "data": str(changed)}))
    assert_one_line_error(cnnlab_here(capsys, "export", moved, "--int8"), "the data changed since")


def test_calibration_is_a_seeded_draw_of_a_few_hundred():
    import torch

    from cnnlab.quantize import CALIBRATION_IMAGES, calibration_sample
    images = torch.arange(1000)
    a, b = calibration_sample(images), calibration_sample(images)
    assert len(a) == CALIBRATION_IMAGES == 256 and torch.equal(a, b)  # the same run calibrates the same way
    assert len(set(a.tolist())) == 256 and a.max() > 900  # 256 different images, drawn from the whole set
    assert torch.equal(calibration_sample(images[:10]), images[:10])
