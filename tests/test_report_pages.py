"""The report's page, built from run folders crafted out of the shared trained run (no training
here): values from a run folder cannot run script or reach files outside it, and the page does not
mislead (whole transfer times, eval-mode overfitting gaps, the seed's figures only beside a run that
reproduces that experiment, one loss axis per data set, mistakes large enough to see)."""
import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, cnnlab_here

from cnnlab.report import PNG_SIGNATURE, build_report
from cnnlab.report_runs import CIFAR10_CLASSES
from cnnlab.runs import read_history, write_history

PAYLOAD = '</script><script>alert("x")</script>'
CLASSES = ["class_0", "class_1", "class_2"]


def crafted(trained_run, where: Path, name: str = "run", config: dict | None = None, metrics: dict | None = None,
            drop: tuple[str, ...] = (), history: dict | None = None) -> Path:
    """A copy of the shared run with its config.json and metrics.json updated (``drop``: metrics
    keys removed) and every history.csv row updated with ``history``."""
    run = shutil.copytree(trained_run.dir, where / name)
    for file, changes, removed in (("config.json", config or {}, ()), ("metrics.json", metrics or {}, drop)):
        record = json.loads((run / file).read_text())
        record.update(changes)
        for key in removed:
            record.pop(key, None)
        (run / file).write_text(json.dumps(record))
    if history:
        write_history(run / "history.csv", [{**row, **history} for row in read_history(run / "history.csv")])
    return run


def report(runs: list[Path], where: Path) -> str:
    return build_report(runs, where / "report.html", log=lambda m: None).read_text()


def runs_table(page: str) -> str:
    return re.search(r'<table id="runs".*?</table>', page, re.S).group(0)


def charts(page: str) -> list[list[dict]]:
    """Each Plotly chart's traces, read back from the page."""
    found = []
    for start in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', page):
        traces, _ = json.JSONDecoder().raw_decode(page, start.end())
        found.append(traces)
    return found


class Tags(HTMLParser):
    """Every script element's text and every event-handler attribute of a page."""

    def __init__(self):
        super().__init__()
        self.scripts, self.handlers, self._in_script = [], [], False

    def handle_starttag(self, tag, attrs):
        self.handlers += [(tag, k, v) for k, v in attrs if k.lower().startswith("on")]
        if tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def tags(page: str) -> Tags:
    parser = Tags()
    parser.feed(page)
    return parser


# ---------------------------------------------------------------- B: a run folder from someone else


def test_values_from_a_crafted_run_folder_are_escaped_everywhere(trained_run, tmp_path):
    clean = report([trained_run.dir], tmp_path)
    names = [PAYLOAD, "<img src=x onerror=alert(1)>", "a&b\"c'd"]
    metrics = json.loads((trained_run.dir / "metrics.json").read_text())
    per_class = {new: metrics["per_class"][old] for old, new in zip(CLASSES, names)}
    env = {k: PAYLOAD for k in ("cnnlab", "torch", "python", "device", "compute_dtype", "native_kernels", "threads",
                                "date")}
    run = crafted(trained_run, tmp_path, "<svg onload=alert(2)>", metrics={"per_class": per_class},
                  config={"class_names": names, "environment": env, "seed": PAYLOAD, "preset": PAYLOAD,
                          "data": PAYLOAD, "ranks": {"world_size": PAYLOAD, "backend": PAYLOAD}})
    page = report([run], tmp_path)
    parsed, baseline = tags(page), tags(clean)
    # no script element and no event handler beyond the page's own
    assert len(parsed.scripts) == len(baseline.scripts) and page.lower().count("</script") == clean.lower().count("</script")
    assert set(parsed.handlers) == set(baseline.handlers) and all(
        tag == "th" and key == "onclick" for tag, key, _ in parsed.handlers)
    assert "<script>alert" not in page and "<img src=x" not in page and "<svg onload" not in page
    escaped = "&lt;/script&gt;&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"
    assert page.count(f"<td>{escaped}</td>") >= 9  # per-class names, environment fields and the seed
    assert "&lt;svg onload=alert(2)&gt;" in page and "<td>a&amp;b&quot;c&#x27;d</td>" in page
    # in the charts' data the names are escaped too (Plotly reads its labels as HTML)
    labels = [trace.get("x") for chart in charts(page) for trace in chart if trace.get("type") == "heatmap"]
    assert labels == [[escaped, "&lt;img src=x onerror=alert(1)&gt;", "a&amp;b&quot;c&#x27;d"]]


def test_an_image_linked_out_of_the_run_is_left_out_saying_so(trained_run, tmp_path):
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(PNG_SIGNATURE + b"SECRET BYTES OF ANOTHER FILE ON THIS MACHINE" * 20)
    run = crafted(trained_run, tmp_path)
    (run / "samples.png").unlink()
    (run / "samples.png").symlink_to(secret)
    (run / "mistakes.png").unlink()
    (run / "mistakes.png").symlink_to("../outside/secret.png")  # relative, leading out
    page = report([run], tmp_path)
    assert base64.b64encode(secret.read_bytes()).decode()[:200] not in page
    assert "samples.png left out: it is a link leading out of the run" in page
    assert "mistakes.png left out: it is a link leading out of the run" in page
    assert "<img alt=" not in page


def test_values_of_another_type_than_a_run_writes_are_shown_not_crashed_on(trained_run, tmp_path):
    run = crafted(trained_run, tmp_path, config={"preset": [PAYLOAD], "environment": [PAYLOAD], "ranks": PAYLOAD,
                                                 "data_info": {"val_size": 2, "train_size": PAYLOAD}, "head": {}},
                  metrics={"weights": [], "run_time_s": None})
    page = report([run], tmp_path)
    assert "<script>alert" not in page and "[&#x27;&lt;/script&gt;&lt;script&gt;alert(" in page


def test_a_name_that_is_no_text_is_shown_escaped(trained_run, tmp_path):
    metrics = json.loads((trained_run.dir / "metrics.json").read_text())
    names = ["bad\ud800name", "two\nlines", "\u202eright-to-left"]  # a lone surrogate, a newline, an override
    run = crafted(trained_run, tmp_path, config={"class_names": names},
                  metrics={"per_class": {new: metrics["per_class"][old] for old, new in zip(CLASSES, names)}})
    page = report([run], tmp_path)
    assert "<td>bad\\ud800name</td>" in page and "<td>two\\nlines</td>" in page and "\u202e" not in page.split("</head>")[1]


def test_an_image_inside_the_run_is_embedded_and_one_that_is_no_png_is_not(trained_run, tmp_path):
    run = crafted(trained_run, tmp_path)
    (run / "samples.png").unlink()
    (run / "samples.png").symlink_to(run / "mistakes.png")  # a link that stays inside: fine
    page = report([run], tmp_path)
    assert page.count(base64.b64encode((run / "mistakes.png").read_bytes()).decode()) == 2
    (run / "mistakes.png").unlink()
    (run / "mistakes.png").write_text("<svg onload=alert(1)>")
    page = report([run], tmp_path)
    assert "mistakes.png left out: it is not a PNG image" in page and "<svg onload" not in page


@pytest.mark.parametrize("name", ["config.json", "metrics.json", "history.csv"])
def test_a_run_file_linked_out_of_the_run_is_one_line(trained_run, tmp_path, capsys, name):
    run = crafted(trained_run, tmp_path)
    outside = shutil.copy(run / name, tmp_path / f"outside-{name}")
    (run / name).unlink()
    (run / name).symlink_to(outside)
    assert_one_line_error(cnnlab_here(capsys, "report", run, "-o", tmp_path / "r.html"),
                          f"{name} is a link leading out of the run")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("file, change, says", [
    ("metrics.json", {"per_class": {"class_0": {"precision": 1, "recall": 1, "f1": 1, "support": PAYLOAD}}},
     "per_class holds a score or support that is not a number"),
    ("metrics.json", {"train_time_s": PAYLOAD}, "train_time_s is not a number"),
    ("metrics.json", {"run_time_s": "12 s"}, "run_time_s is not a number"),
    ("metrics.json", {"train_accuracy_eval": [1]}, "train_accuracy_eval is not a number"),
    ("metrics.json", {"parameters": "1e6"}, "parameters is not a count"),
    ("metrics.json", {"best_epoch": 0}, "best_epoch 0 is not one of history.csv's 1 epochs"),
    ("metrics.json", {"confusion_matrix": [[PAYLOAD] * 3] * 3}, "confusion_matrix is not 3 x 3 counts"),
    ("metrics.json", {"metrics_version": "2"}, "metrics_version is not a number"),
    ("config.json", {"class_names": [PAYLOAD, 1, 2]}, "config.json: class_names"),
    ("config.json", {"kind": PAYLOAD}, "kind is neither train nor transfer"),
    ("config.json", {"kind": ["train"]}, "kind is neither train nor transfer"),
])
def test_a_non_number_where_a_number_belongs_is_one_line(trained_run, tmp_path, capsys, file, change, says):
    run = crafted(trained_run, tmp_path, **{"metrics" if file == "metrics.json" else "config": change})
    result = cnnlab_here(capsys, "report", run, "-o", tmp_path / "r.html")
    assert_one_line_error(result, "is damaged")
    assert says in result.stderr


# ---------------------------------------------------------------- A: a report that does not mislead


def transfer_changes(**metrics) -> dict:
    return dict(config={"kind": "transfer", "backbone": "efficientnet_lite0", "head": "gap", "tta": 1},
                metrics={"train_time_s": 0.4, "images_per_s": 54324.0, "feature_extraction_s": 30.0, **metrics},
                drop=("train_accuracy_eval",), history={"phase": "frozen", "images_per_s": 54324.0})


def test_a_transfer_runs_time_is_the_whole_run_with_extraction_and_training_apart(trained_run, tmp_path):
    run = crafted(trained_run, tmp_path, **transfer_changes(run_time_s=31.5))
    table = runs_table(report([run], tmp_path))
    assert '<td data-v="31.5">31.5<br><small>extraction 30.0 · training 0.4 · other 1.1' in table
    assert "54324" not in table and "54,324" not in table  # the head on cached features is no speed to show
    assert "head trained on cached features: see time" in table


def test_a_run_from_before_whole_run_times_says_what_its_time_is(trained_run, tmp_path):
    run = crafted(trained_run, tmp_path, **transfer_changes())
    (run / "metrics.json").write_text(json.dumps({k: v for k, v in json.loads((run / "metrics.json").read_text()).items()
                                                  if k != "run_time_s"}))
    table = runs_table(report([run], tmp_path))
    assert ('<td data-v="30.4">30.4<br><small>extraction 30.0 + training 0.4; whole run not recorded'
            in table)


def test_the_overfit_gap_uses_the_eval_mode_training_accuracy(trained_run, tmp_path):
    history = read_history(trained_run.dir / "history.csv")
    val = history[0]["val_accuracy"]
    run = crafted(trained_run, tmp_path, metrics={"train_accuracy_eval": 0.9, "best_epoch": 1, "weights": "best"},
                  history={"accuracy": 0.25})
    table = runs_table(report([run], tmp_path))
    assert f"{0.9 - val:.2%}<br><small>eval mode</small>" in table
    old = crafted(trained_run, tmp_path, "old", drop=("train_accuracy_eval",), history={"accuracy": 0.25})
    table = runs_table(report([old], tmp_path))
    assert f"{0.25 - val:.2%}<br><small>train mode, dropout on" in table  # labelled, not passed off as eval mode


def cifar10_changes(preset: str, **config) -> dict:
    cm = np.eye(10, dtype=int).tolist()
    per_class = {n: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for n in CIFAR10_CLASSES}
    return dict(config={"preset": preset, "class_names": CIFAR10_CLASSES, "input_shape": [3, 32, 32], **config},
                metrics={"confusion_matrix": cm, "per_class": per_class})


def test_the_seeds_figures_stand_only_beside_a_run_of_that_experiment(trained_run, tmp_path):
    own = crafted(trained_run, tmp_path, "own-data")  # pool-bn on class_0..class_2
    page = report([own], tmp_path)
    assert "Original:" not in page and "~76% (epoch 13)" not in page and "<b>This run:</b>" in page
    on_cifar = crafted(trained_run, tmp_path, "pool-bn-cifar10", **cifar10_changes("pool-bn"))
    conv = crafted(trained_run, tmp_path, "conv-cifar10", **cifar10_changes("conv"))
    page = report([own, on_cifar, conv], tmp_path)
    assert page.count("<b>Original:</b>") == 2 and "~76% (epoch 13)" in page and "57.19%" in page
    rows = runs_table(page).split("<tr>")[2:]
    assert [row.rsplit("<td", 1)[1] for row in rows] == [' data-v="–">–</td></tr>', ' data-v="n/a">n/a</td></tr>',
                                                         ' data-v="57.19%">57.19%</td></tr></tbody></table>']


@pytest.mark.parametrize("command, data, shown", [("cnnlab reproduce --quick", "/data/cifar10", True),
                                                  ("cnnlab train --model conv", "/data/cifar10", False),
                                                  ("cnnlab reproduce --quick", "/data/my-photos", False)])
def test_a_reproduce_subset_of_cifar10_keeps_the_seeds_figures(trained_run, tmp_path, command, data, shown):
    run = crafted(trained_run, tmp_path, config={"preset": "conv", "command": command, "data": data})
    assert ("57.19%" in report([run], tmp_path)) == shown


@pytest.mark.parametrize("classes, shown", [(["cat", "dog"], True), (["cat", "dog", "fox"], False)])
def test_the_seeds_transfer_figure_needs_cats_and_dogs(trained_run, tmp_path, classes, shown):
    changes = transfer_changes(run_time_s=31.5)
    changes["config"]["class_names"] = classes
    k = len(classes)
    per_class = {n: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for n in classes}
    changes["metrics"].update(confusion_matrix=np.eye(k, dtype=int).tolist(), per_class=per_class)
    assert ("97.29%" in report([crafted(trained_run, tmp_path, **changes)], tmp_path)) == shown


def test_runs_of_different_data_sets_do_not_share_a_loss_chart(trained_run, tmp_path):
    a = crafted(trained_run, tmp_path, "run-a")
    b = crafted(trained_run, tmp_path, "run-b")
    letters = ["x", "y", "z"]
    metrics = json.loads((trained_run.dir / "metrics.json").read_text())
    other = crafted(trained_run, tmp_path, "run-other", config={"class_names": letters, "data": "/elsewhere"},
                    metrics={"per_class": {n: metrics["per_class"][c] for c, n in zip(CLASSES, letters)}})

    def together(page):
        groups = [{t.get("legendgroup") for t in chart} - {None} for chart in charts(page)]
        return [g for g in groups if g]  # the confusion matrices have none
    groups = together(report([a, b, other], tmp_path))
    assert {"run-a", "run-b"} in groups  # the same data: one chart
    assert not any("run-other" in g and len(g) > 1 for g in groups)
    assert all(len(g) == 1 for g in together(report([a, other], tmp_path)))


def test_the_mistakes_grid_shows_large_photos(tmp_path):
    from PIL import Image

    from cnnlab.plots import image_grid
    photos = np.random.default_rng(0).integers(0, 255, (12, 3, 224, 224), dtype=np.uint8)
    image_grid(photos, [0] * 12, ["cat", "dog"], tmp_path / "mistakes.png", title="most confident mistakes",
               captions=["cat → dog 99%"] * 12)
    width, height = Image.open(tmp_path / "mistakes.png").size
    assert width >= 4 * 224 and height >= 3 * 224  # 4 columns of cells at least the photos' own size
    small = np.zeros((18, 3, 32, 32), dtype=np.uint8)
    image_grid(small, [0] * 18, ["a"], tmp_path / "samples.png")
    assert Image.open(tmp_path / "samples.png").size[0] < 1400  # the samples grid as it was
    image_grid(photos[:0], [], ["cat", "dog"], tmp_path / "none.png", title="most confident mistakes", captions=[])
    assert Image.open(tmp_path / "none.png").size[0] < 600  # no mistakes: one cell saying "none"
    odd = ["a$\\frac{$b", "two\nlines"]  # a class name matplotlib would read as a broken formula
    image_grid(small[:2], [0, 1], odd, tmp_path / "odd.png", captions=[f"{odd[0]} → {odd[1]} 90%", "$x$ → y 1%"])


def test_the_report_shows_the_mistakes_at_the_pages_width(trained_run, tmp_path):
    page = report([trained_run.dir], tmp_path)
    assert '<figure class="wide"><img alt="most confident mistakes' in page
