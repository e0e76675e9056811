"""Runs -> one self-contained HTML page: comparison table, curves, confusion matrices, images.

A run directory may come from someone else: every value read from it is escaped (on the page and in
the charts' labels) or checked to be a number (else a one-line "damaged" error), and files are read
only from inside it, never through a link leading out. Charts are Plotly figures with plotly.js
inlined once, images embedded as base64: the file opens from disk with no network.
"""
from __future__ import annotations

import base64
import html
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .atomic import WriteError, atomic_write_bytes
from .errors import CnnlabError
from .report_runs import inside, is_number, read_run
from .text import shown
from .version import __version__

COLUMNS = ["run", "kind", "model", "params", "epochs", "best epoch", "time (s)", "images/s", "best val acc",
           "test acc", "test bal acc", "test loss", "overfit gap", "seed test acc"]
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
IMAGE_LIMIT = 32 * 2**20  # bytes: a bigger "PNG" in a run folder is not embedded
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MISTAKES = {False: "most confident mistakes: true → predicted, probability",
            True: "most confident mistakes: true labels → predicted labels, the label most wrong and its probability"}

def _esc(value) -> str:
    """A value as the page's text: one printable line (``text.shown``), HTML-escaped, quotes included."""
    return html.escape(shown(value))


def _time(m: dict) -> tuple[str, float, str]:
    """(seconds shown, sort value, their parts): the whole run, feature extraction and training apart."""
    train, extraction, whole = m["train_time_s"], m.get("feature_extraction_s"), m.get("run_time_s")
    parts = ([f"extraction {extraction:.1f}"] if extraction is not None else []) + [f"training {train:.1f}"]
    known = train + (extraction or 0.0)
    if whole is None:
        return f"{known:.1f}", known, " + ".join(parts) + "; whole run not recorded (an older run)"
    if whole + 0.05 < known:  # resumed: this attempt's wall time is part of the run
        return f"{known:.1f}", known, " + ".join(parts) + f" over every attempt; the last attempt took {whole:.1f}"
    return f"{whole:.1f}", whole, " · ".join(parts + [f"other {whole - known:.1f}"])


def _speed(info: dict) -> tuple[str, float, str]:
    """(images/s shown, sort value, note): a head trained on cached features is no speed to show."""
    m = info["metrics"]
    if info["kind"] == "transfer" and m.get("feature_extraction_s") is not None:
        tuned = [r["images_per_s"] for r in info["history"]
                 if r.get("phase") == "fine-tune" and is_number(r.get("images_per_s"))]
        if tuned:
            return f"{sum(tuned) / len(tuned):.0f}", sum(tuned) / len(tuned), "fine-tuning epochs"
        return "–", -1, "head trained on cached features: see time"
    return f"{m['images_per_s']:.0f}", m["images_per_s"], ""


def _table(infos: list[dict]) -> str:
    def pct(v, note=""):
        return (f"{v:.2%}", v, note) if v is not None else ("–", -1, "")
    head = "".join(f'<th onclick="sortTable({i})" title="sort">{_esc(c)} ⇅</th>' for i, c in enumerate(COLUMNS))
    rows = []
    for info in infos:
        m, seed = info["metrics"], info["seed"]["test"] if info["seed"] else "–"
        row = [(info["name"], info["name"], ""), (info["kind"], info["kind"], ""), (info["model"], info["model"], ""),
               (f"{m['parameters']:,}", m["parameters"], ""), (str(m["epochs_run"]), m["epochs_run"], ""),
               (str(m["best_epoch"]), m["best_epoch"], ""), _time(m), _speed(info), *_accuracies(info, pct),
               (f"{m['test_loss']:.4f}", m["test_loss"], ""), pct(*info["gap"]),
               (seed, seed, "")]
        rows.append("<tr>" + "".join(f'<td data-v="{_esc(v)}">{_esc(t)}'
                                     f'{f"<br><small>{_esc(note)}</small>" if note else ""}</td>'
                                     for t, v, note in row) + "</tr>")
    return f'<table id="runs" class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _accuracies(info: dict, pct: Callable) -> list[tuple]:
    """The cells best val acc, test acc and test bal acc; for a run of several labels per image,
    the validation mAP, test mAP and test macro F1 in their place, each cell saying so."""
    m = info["metrics"]
    if info["multi_label"]:
        return [pct(m.get("best_val_map"), "val mAP"), pct(m["test_map"], "mAP (several labels per image)"),
                pct(m["test_f1"], "macro F1")]
    return [pct(m.get("best_val_accuracy")), pct(m["test_accuracy"]), pct(m.get("test_balanced_accuracy"))]


def _curves(infos: list[dict], title: str, overlay: bool):
    """Loss and accuracy per epoch; every text from a run escaped, as Plotly reads its labels as HTML."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    for i, info in enumerate(infos):
        color, h, best, group = PALETTE[i % len(PALETTE)], info["history"], info["metrics"]["best_epoch"], _esc(info["name"])
        epochs, prefix = [r["epoch"] for r in h], f"{group} " if overlay else ""
        for col, key in ((1, "loss"), (2, "accuracy")):
            for label, column, line in [("train", key, {"dash": "dash", "color": color})] + (
                    [("val", f"val_{key}", {"color": color})] if info["validated"] else []):
                fig.add_trace(go.Scatter(x=epochs, y=[r[column] for r in h], mode="lines", name=f"{prefix}{label}",
                                         line=line, legendgroup=group, showlegend=col == 1), row=1, col=col)
            if info["validated"] and best and best <= len(h):
                fig.add_trace(go.Scatter(x=[best], y=[h[best - 1][f"val_{key}"]], mode="markers",
                                         marker={"symbol": "star", "size": 12, "color": color},
                                         name=f"{prefix}best epoch {best}", legendgroup=group,
                                         showlegend=False), row=1, col=col)
        phases = [r.get("phase") for r in h]
        if "fine-tune" in phases:
            start = epochs[phases.index("fine-tune")] - 0.5
            fig.add_vline(x=start, line_dash="dot", line_color="red", row=1, col=1, annotation_text="fine-tuning")
            fig.add_vline(x=start, line_dash="dot", line_color="red", row=1, col=2)
    fig.update_layout(title=title, height=380, margin={"t": 60, "b": 40, "l": 50, "r": 20}, hovermode="x unified")
    fig.update_xaxes(title_text="epoch")
    return fig


def _overlays(infos: list[dict], fig_html: Callable) -> str:
    """A chart of the curves per data set (class names, data folder): losses of different ones are on no one scale."""
    groups: dict[tuple, list[dict]] = {}
    for info in infos:
        groups.setdefault((tuple(info["config"]["class_names"]), str(info["config"].get("data"))), []).append(info)
    legend = "train dashed, validation solid, ★ best epoch"
    if len(groups) == 1:
        return fig_html(_curves(infos, f"all runs: {legend}", overlay=True)) if len(infos) > 1 else ""
    charts = [fig_html(_curves(group, f"runs on {_esc(Path(data).name or data)} ({len(names)} classes: "
                                      f"{_esc(', '.join(names[:6]) + (', …' if len(names) > 6 else ''))}): {legend}",
                               overlay=True)) for (names, data), group in groups.items() if len(group) > 1]
    return ('<p class="sub">the runs trained on different data sets, whose losses are not on one scale: each data '
            "set's runs share a chart, and a run alone on its data has its curves in its own section</p>"
            + "".join(charts))


def _label_scores(info: dict) -> str:
    """A run of several labels per image: its mAP, macro and micro F1 and subset accuracy, and
    each label's threshold, precision, recall, F1, average precision and support (test)."""
    m = info["metrics"]
    rows = "".join(f"<tr><td>{_esc(name)}</td><td>{v['threshold']:.3f}</td><td>{v['precision']:.3f}</td>"
                   f"<td>{v['recall']:.3f}</td><td>{v['f1']:.3f}</td><td>{v['average_precision']:.3f}</td>"
                   f"<td>{v['support']}</td></tr>" for name, v in m["per_label"].items())
    subset = m.get("test_subset_accuracy", m["test_accuracy"])
    how = "tuned on the validation split" if m.get("thresholds_tuned") else "the run's --threshold"
    return (f'<h3>per label (test)</h3><p class="sub">mAP {m["test_map"]:.3f} · macro F1 {m["test_f1"]:.3f} · micro '
            f'F1 {m["test_micro_f1"]:.3f} · subset accuracy {subset:.3f} (every label right); each label predicted '
            f'at its threshold ({_esc(how)})</p><table class="grid small"><thead><tr><th>label</th><th>threshold</th><th>precision</th>'
            f"<th>recall</th><th>F1</th><th>AP</th><th>support</th></tr></thead><tbody>{rows}</tbody></table>")


def _test_scores(info: dict, fig_html: Callable) -> str:
    """The confusion matrix (class names escaped for Plotly) beside the per-class scores; per-label
    scores for a run of several labels per image."""
    if info["multi_label"]:
        return _label_scores(info)
    import plotly.graph_objects as go
    names, cm = [_esc(n) for n in info["config"]["class_names"]], info["metrics"]["confusion_matrix"]
    fig = go.Figure(go.Heatmap(z=cm, x=names, y=names, colorscale="Blues", text=cm, texttemplate="%{text}",
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{z} images<extra></extra>"))
    size = 260 + 32 * len(names)
    fig.update_layout(title="confusion matrix (test)", width=size + 80, height=size, margin={"t": 40, "b": 40})
    fig.update_yaxes(autorange="reversed", title_text="true")
    fig.update_xaxes(title_text="predicted")
    rows = "".join(f"<tr><td>{_esc(name)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
                   f"<td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>"
                   for name, v in info["metrics"]["per_class"].items())
    return (f'<div class="row"><div>{fig_html(fig)}</div><div><h3>per class (test)</h3><table class="grid small"><thead>'
            f"<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr></thead><tbody>{rows}</tbody></table></div></div>")


def _image(run_dir: Path, name: str, alt: str, css: str = "") -> str:
    """``run_dir/name`` embedded if it is a regular PNG file inside the run (no link out), else a note saying why not."""
    path, data = run_dir / name, b""
    if not (path.is_symlink() or path.exists()):
        return ""
    why = ("it is a link leading out of the run" if not inside(path, run_dir.resolve()) else
           "" if path.is_file() else "it is not a regular file")
    if not why:
        try:
            with open(path, "rb") as f:
                data = f.read(IMAGE_LIMIT + 1)
            why = (f"it is over {IMAGE_LIMIT // 2**20} MiB" if len(data) > IMAGE_LIMIT else
                   "" if data.startswith(PNG_SIGNATURE) else "it is not a PNG image")
        except OSError as exc:
            why = f"it cannot be read ({exc.strerror})"
    if why:
        return f'<p class="failed">{_esc(f"{name} left out: {why}")}</p>'
    return (f'<figure{css}><img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
            f"<figcaption>{_esc(alt)}</figcaption></figure>")


def _summary(info: dict) -> str:
    """The run in one line, and beside it the original study's figures when it reproduces one."""
    seed, m, config = info["seed"], info["metrics"], info["config"]
    val, (time_text, _, time_parts) = m.get("best_val_accuracy"), _time(m)
    size = config["data_info"].get("train_size") if isinstance(config.get("data_info"), dict) else None
    images = f" on {size:,} training images" if is_number(size, True) else ""
    ours = (f"{m['epochs_run']} epoch{'' if m['epochs_run'] == 1 else 's'}{images} (best {m['best_epoch']}), "
            f"{time_text} s ({time_parts}), best val "
            f"{f'{val:.2%}' if val is not None else '- (no validation images)'}, test {m['test_accuracy']:.2%}"
            + (f" (balanced {balanced:.2%})" if (balanced := m.get("test_balanced_accuracy")) is not None else ""))
    if info["multi_label"]:  # several labels per image: mAP and F1; the subset accuracy (every label right)
        best_map, subset = m.get("best_val_map"), m.get("test_subset_accuracy", m["test_accuracy"])
        ours = (ours.split(", best val")[0] + ", best val mAP "
                f"{f'{best_map:.2%}' if best_map is not None else '- (no validation images)'}, test mAP "
                f"{m['test_map']:.2%}, macro F1 {m['test_f1']:.2%}, micro F1 {m['test_micro_f1']:.2%}, subset "
                f"accuracy {subset:.2%} (each label at its saved threshold)")
    if not seed:
        return f'<p class="sub"><b>This run:</b> {_esc(ours)}.</p>'
    theirs = f"{seed['epochs']} epochs, {seed['time']}, val {seed['val']}, test {seed['test']}"
    extra = f" ({seed['notes']})" if seed["notes"] else ""
    recipe = f"{config.get('head', 'flatten')} head" + (", mirror test-time augmentation" if config.get("tta") else "")
    backbone = (f" Backbone used here: <b>{_esc(info['model'])}</b>, {_esc(recipe)} (the original used VGG19, "
                "flatten head).") if info["kind"] == "transfer" else ""
    return (f'<p class="seed"><b>Original:</b> {_esc(theirs)}{_esc(extra)}<br><b>Reproduction:</b> '
            f"{_esc(ours)}.{backbone}</p>")


def _environment(infos: list[dict]) -> str:
    rows = []
    for info in infos:
        config = info["config"]
        env = config.get("environment") if isinstance(config.get("environment"), dict) else {}
        ranks = config.get("ranks") if isinstance(config.get("ranks"), dict) else {}
        size = ranks.get("world_size", 1)  # '4 (nccl, 32 images per rank)' for a run on 4 ranks under torchrun
        ranks = str(size) if size == 1 else f"{size} ({ranks.get('backend')}, {ranks.get('batch_per_rank')} images per rank)"
        cells = [info["name"], env.get("cnnlab", "?"), env.get("torch", "?"), env.get("python", "?"),
                 env.get("device", "?"), env.get("compute_dtype", "float32" if env.get("device") == "cpu" else "?"),
                 env.get("native_kernels", "-"), env.get("threads", "?"), ranks, config.get("seed", "?"),
                 env.get("date", "?")]
        rows.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    return ('<table class="grid small"><thead><tr><th>run</th><th>cnnlab</th><th>torch</th><th>python</th>'
            f'<th>device</th><th>compute dtype</th><th>native kernels</th><th>threads</th><th>ranks</th><th>seed</th><th>date</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{margin-bottom:4px} .sub{color:#666;margin-top:0} table.grid{border-collapse:collapse;margin:12px 0;font-size:14px} table.grid th,table.grid td{border:1px solid #ddd;padding:4px 8px;text-align:right} table.small{font-size:13px}
table.grid th{background:#f3f5f8;cursor:pointer;user-select:none} table.grid td:first-child{text-align:left}
table.grid td small{color:#777;font-size:11px} .run{border-top:2px solid #e5e5e5;margin-top:28px;padding-top:8px}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start} figure{margin:0} figure img{max-width:560px;border:1px solid #eee}
figure.wide{margin-top:12px} figure.wide img{max-width:100%;height:auto} figcaption{font-size:12px;color:#666} .seed{background:#fafaf0;border-left:4px solid #d8c96b;padding:6px 10px} .failed{background:#fff0f0;border-left:4px solid #d66;padding:6px 10px}
"""
SORT_SCRIPT = """function sortTable(col){const t=document.getElementById('runs'),b=t.tBodies[0],rows=[...b.rows];
const dir=t.dataset.col==String(col)&&t.dataset.dir=='asc'?'desc':'asc';t.dataset.col=col;t.dataset.dir=dir;
rows.sort((x,y)=>{const a=x.cells[col].dataset.v,c=y.cells[col].dataset.v,na=parseFloat(a),nc=parseFloat(c);
const r=(!isNaN(na)&&!isNaN(nc))?na-nc:a.localeCompare(c);return dir=='asc'?r:-r});rows.forEach(r=>b.appendChild(r));}"""
EXPLAINED = """click a column to sort. Test bal acc: the balanced accuracy, the mean of the classes' recalls (each class
counts alike, however many images it has). Time: the whole run, loading to test, and under it its parts: feature extraction
(transfer runs), the training epochs (validation included), the rest. Overfit gap: training minus validation accuracy of
the weights kept, the training accuracy measured in evaluation mode (dropout off) where the run recorded it; a transfer
run's is its epochs' (its base runs in evaluation mode, its head has no dropout: only augmentation sets it apart). The
last column: the original study's test accuracy where a run reproduces that experiment (a seed preset on CIFAR-10, or
transfer learning on cats vs dogs). A run of several labels per image (multi-label) shows its validation mAP, test mAP
and macro F1 in the three accuracy columns, each cell saying so, and its accuracy curves are subset accuracies (every
label right)"""


def build_report(run_dirs: list[str | Path], output: str | Path, title: str = "cnnlab report",
                 failures: list[str] | None = None, log: Callable[[str], None] = print) -> Path:
    """Writes the report of the finished runs among ``run_dirs`` to ``output``; unfinished runs and ``failures``
    are listed as such. Runs rescored (``_rescore``) are named on the page and in one ``log`` line."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    infos, unfinished = [], []
    for d in run_dirs:
        info = read_run(Path(d))
        (infos.append(info) if info else unfinished.append(Path(d).name))
    if not infos and not failures:
        raise CnnlabError("no finished runs to report; pass run directories that hold metrics.json")

    def fig_html(fig) -> str:
        return pio.to_html(fig, full_html=False, include_plotlyjs=False, config={"displaylogo": False})

    notes = [f'<p class="failed">{_esc(f)}</p>' for f in failures or []]
    rescored = [info["name"] for info in infos if info["rescored"]]
    if rescored:
        said = (f"{len(rescored)} run(s) ({', '.join(rescored)}) have a metrics.json from before cnnlab's F1 fix: their "
                "test precision, recall and F1 are recomputed from the confusion matrix (history.csv's val_f1 stays as it was written)")
        log(f"note: {shown(said)}")
        notes.append(f'<p class="failed">{_esc(said)}</p>')
    notes += [f'<p class="failed">unfinished (not reported): {_esc(n)} — continue it with '
              f'<code>cnnlab resume</code></p>' for n in unfinished]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = "".join(f"""<section class="run" id="run-{_esc(info['name'])}">
<h2>{_esc(info['name'])} <small>({_esc(info['kind'])}: {_esc(info['model'])})</small></h2>
{_summary(info)}
{fig_html(_curves([info], f"{_esc(info['name'])}: learning curves", overlay=False))}
{_test_scores(info, fig_html)}
<div class="row">{_image(info['dir'], 'samples.png', 'random training images')}</div>
{_image(info['dir'], 'mistakes.png', MISTAKES[info['multi_label']], ' class="wide"')}
</section>""" for info in infos)
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>
<style>{STYLE}</style><script>{get_plotlyjs()}</script><script>{SORT_SCRIPT}</script></head><body>
<h1>{_esc(title)}</h1><p class="sub">{len(infos)} runs · made {now} by cnnlab {__version__} on Python
{platform.python_version()} · accuracies are measured once on each run's held-out test split</p>
{''.join(notes)}
<h2>Runs side by side</h2><p class="sub">{EXPLAINED}</p>
{_table(infos)}
{_overlays(infos, fig_html) if infos else ""}
{sections}
<h2>Environment</h2>{_environment(infos)}
</body></html>"""
    output = Path(output)
    if output.is_dir():
        raise CnnlabError(f"-o {output} is a folder; pass a file name such as {output / 'report.html'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output, page.encode("utf-8", "backslashreplace"))
    except (OSError, WriteError) as exc:
        raise CnnlabError(f"cannot write the report to {output} ({getattr(exc, 'strerror', None) or exc}); "
                          "pass -o a file in a writable folder") from None
    return output
