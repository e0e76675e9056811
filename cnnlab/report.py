"""Runs -> one self-contained HTML page: comparison table, curves, confusion matrices, images.

Everything is read from the run directories. Charts are Plotly figures (hover values, zoom) with
plotly.js inlined once, images are embedded as base64, so the file opens from disk with no network.
"""
from __future__ import annotations

import base64
import html
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .atomic import WriteError, atomic_write_bytes
from .errors import CnnlabError
from .metrics import METRICS_VERSION, summarize
from .runs import load_run, read_history

# The original study's figures (SEED-STUDY.md), shown beside a run that reproduces one.
SEED_FIGURES = {
    "conv": {"epochs": "20", "time": "803.6 s (~40 s/epoch)", "val": "~66% (peak, epoch 5)", "test": "57.19%",
             "notes": "train acc 98%: heavy overfitting"},
    "pool-bn": {"epochs": "20", "time": "~12 s/epoch", "val": "~76% (epoch 13)", "test": "n/a", "notes": ""},
    "dropout": {"epochs": "60", "time": "383.2 s (~6 s/epoch)", "val": "~69%", "test": "59.42%",
                "notes": "test images scaled unlike training images"},
    "early-stop": {"epochs": "stopped at 12", "time": "~3 s/epoch", "val": "~68%", "test": "n/a",
                   "notes": "restored epoch 7"},
    "transfer": {"epochs": "3-4", "time": "n/a", "val": "n/a", "test": "97.29%",
                 "notes": "VGG19, frozen conv base, 1 sigmoid unit"},
}
COLUMNS = ["run", "kind", "model", "params", "epochs", "best epoch", "train time (s)", "images/s", "best val acc",
           "test acc", "test loss", "overfit gap", "seed test acc"]
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


METRICS_READ = ("best_epoch", "parameters", "epochs_run", "train_time_s", "images_per_s", "test_accuracy",
                "test_loss", "confusion_matrix", "per_class")
HISTORY_READ = ("epoch", "loss", "accuracy")
VALIDATION_READ = ("val_loss", "val_accuracy")  # absent from a run trained with --val-split 0


def _run_info(run_dir: Path) -> dict | None:
    config, metrics = load_run(run_dir)
    if metrics is None:
        return None
    history = read_history(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else []
    validated = _validated(config)
    missing = [f"metrics.json: {k}" for k in METRICS_READ if k not in metrics] + [
        f"history.csv row {i + 1}: {k}" for i, row in enumerate(history)
        for k in HISTORY_READ + (VALIDATION_READ if validated else ()) if not isinstance(row.get(k), (int, float))]
    if missing or not isinstance(config.get("class_names"), list):
        raise CnnlabError(f"{run_dir} is damaged ({(missing or ['config.json: class_names'])[0]} missing or not a "
                          "number); restore the file from a copy, or leave the run out of the report")
    rescored = _rescore(metrics, config["class_names"], run_dir)
    kind = config.get("kind", "train")
    best = metrics["best_epoch"]
    gap = history[best - 1]["accuracy"] - history[best - 1]["val_accuracy"] if history and validated else None
    seed_key = "transfer" if kind == "transfer" else config.get("preset")
    return {"dir": run_dir, "name": run_dir.name, "config": config, "metrics": metrics, "history": history,
            "kind": kind, "model": config.get("backbone") if kind == "transfer" else config.get("preset"),
            "gap": gap, "seed": SEED_FIGURES.get(seed_key), "rescored": rescored}


def _rescore(metrics: dict, class_names: list[str], run_dir: Path) -> bool:
    """Recomputes the scores of a metrics.json written before ``METRICS_VERSION`` (whose F1 was
    2PR wherever a class's precision + recall < 1) from its confusion matrix; True if it did."""
    if metrics.get("metrics_version", 1) >= METRICS_VERSION:
        return False
    cm = metrics["confusion_matrix"]
    k = len(class_names)
    if not (isinstance(cm, list) and len(cm) == k and all(isinstance(r, list) and len(r) == k and
                                                          all(isinstance(v, int) and v >= 0 for v in r) for r in cm)):
        raise CnnlabError(f"{run_dir} is damaged (metrics.json: confusion_matrix is not {k} x {k} counts); restore "
                          "the file from a copy, or leave the run out of the report")
    scores = summarize(torch.tensor(cm), class_names)
    metrics.update({"per_class": scores["per_class"], "test_precision": scores["precision"],
                    "test_recall": scores["recall"], "test_f1": scores["f1"],
                    "test_balanced_accuracy": scores["balanced_accuracy"]})
    return True


def _validated(config: dict) -> bool:
    """Whether the run scored validation images each epoch (not with --val-split 0)."""
    info = config.get("data_info") if isinstance(config.get("data_info"), dict) else {}
    return info.get("val_size", 1) != 0


def _row(info: dict) -> list[tuple[str, object]]:
    """(shown text, sort value) per column."""
    m = info["metrics"]

    def pct(v):
        return (f"{v:.2%}", v) if v is not None else ("–", -1)
    seed = info["seed"]["test"] if info["seed"] else "–"
    return [(info["name"], info["name"]), (info["kind"], info["kind"]), (info["model"], info["model"]),
            (f"{m['parameters']:,}", m["parameters"]), (str(m["epochs_run"]), m["epochs_run"]),
            (str(m["best_epoch"]), m["best_epoch"]), (f"{m['train_time_s']:.1f}", m["train_time_s"]),
            (f"{m['images_per_s']:.0f}", m["images_per_s"]), pct(m.get("best_val_accuracy")),
            pct(m["test_accuracy"]), (f"{m['test_loss']:.4f}", m["test_loss"]),
            pct(info["gap"]), (seed, seed)]


def _table(infos: list[dict]) -> str:
    head = "".join(f'<th onclick="sortTable({i})" title="sort">{html.escape(c)} ⇅</th>' for i, c in enumerate(COLUMNS))
    rows = []
    for info in infos:
        cells = "".join(f'<td data-v="{html.escape(str(v))}">{html.escape(str(t))}</td>' for t, v in _row(info))
        rows.append(f"<tr>{cells}</tr>")
    return f'<table id="runs" class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _curves(infos: list[dict], title: str, overlay: bool):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    for i, info in enumerate(infos):
        color = PALETTE[i % len(PALETTE)]
        h = info["history"]
        epochs = [r["epoch"] for r in h]
        best = info["metrics"]["best_epoch"]
        for col, key in ((1, "loss"), (2, "accuracy")):
            prefix = f"{info['name']} " if overlay else ""
            fig.add_trace(go.Scatter(x=epochs, y=[r[key] for r in h], mode="lines", name=f"{prefix}train",
                                     line={"dash": "dash", "color": color}, legendgroup=info["name"],
                                     showlegend=col == 1), row=1, col=col)
            if not _validated(info["config"]):
                continue
            fig.add_trace(go.Scatter(x=epochs, y=[r[f"val_{key}"] for r in h], mode="lines", name=f"{prefix}val",
                                     line={"color": color}, legendgroup=info["name"], showlegend=col == 1),
                          row=1, col=col)
            if best and best <= len(h):
                fig.add_trace(go.Scatter(x=[best], y=[h[best - 1][f"val_{key}"]], mode="markers",
                                         marker={"symbol": "star", "size": 12, "color": color},
                                         name=f"{prefix}best epoch {best}", legendgroup=info["name"],
                                         showlegend=False), row=1, col=col)
        phases = [r.get("phase") for r in h]
        if "fine-tune" in phases:
            start = epochs[phases.index("fine-tune")] - 0.5
            fig.add_vline(x=start, line_dash="dot", line_color="red", row=1, col=1, annotation_text="fine-tuning")
            fig.add_vline(x=start, line_dash="dot", line_color="red", row=1, col=2)
    fig.update_layout(title=title, height=380, margin={"t": 60, "b": 40, "l": 50, "r": 20}, hovermode="x unified")
    fig.update_xaxes(title_text="epoch")
    return fig


def _confusion(info: dict):
    import plotly.graph_objects as go
    names = info["config"]["class_names"]
    cm = info["metrics"]["confusion_matrix"]
    fig = go.Figure(go.Heatmap(z=cm, x=names, y=names, colorscale="Blues", text=cm, texttemplate="%{text}",
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{z} images<extra></extra>"))
    size = 260 + 32 * len(names)
    fig.update_layout(title="confusion matrix (test)", width=size + 80, height=size, margin={"t": 40, "b": 40})
    fig.update_yaxes(autorange="reversed", title_text="true")
    fig.update_xaxes(title_text="predicted")
    return fig


def _per_class(info: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
                   f"<td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>"
                   for name, v in info["metrics"]["per_class"].items())
    return (f'<table class="grid small"><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>'
            f"<th>support</th></tr></thead><tbody>{rows}</tbody></table>")


def _image(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _seed_note(info: dict) -> str:
    seed = info["seed"]
    if not seed:
        return ""
    m = info["metrics"]
    val = m.get("best_val_accuracy")
    ours = (f"{m['epochs_run']} epochs (best {m['best_epoch']}), {m['train_time_s']:.1f} s, best val "
            f"{f'{val:.2%}' if val is not None else '- (no validation images)'}, test {m['test_accuracy']:.2%}")
    theirs = f"{seed['epochs']} epochs, {seed['time']}, val {seed['val']}, test {seed['test']}"
    extra = f" ({seed['notes']})" if seed["notes"] else ""
    backbone = ""
    if info["kind"] == "transfer":
        config = info["config"]
        recipe = f"{config.get('head', 'flatten')} head" + (", mirror test-time augmentation" if config.get("tta") else "")
        backbone = (f" Backbone used here: <b>{html.escape(info['model'])}</b>, {html.escape(recipe)} (the original "
                    "used VGG19, flatten head).")
    return (f'<p class="seed"><b>Original:</b> {html.escape(theirs)}{html.escape(extra)}<br><b>Reproduction:</b> '
            f"{html.escape(ours)}.{backbone}</p>")


def _ranks(config: dict) -> str:
    """'1', or '4 (nccl, 32 images per rank)' for a run on several ranks under torchrun."""
    ranks = config.get("ranks") if isinstance(config.get("ranks"), dict) else {}
    size = ranks.get("world_size", 1)
    return str(size) if size == 1 else f"{size} ({ranks.get('backend')}, {ranks.get('batch_per_rank')} images per rank)"


def _environment(infos: list[dict]) -> str:
    rows = []
    for info in infos:
        env = info["config"].get("environment", {})
        rows.append(f"<tr><td>{html.escape(info['name'])}</td><td>{env.get('cnnlab', '?')}</td><td>{env.get('torch', '?')}"
                    f"</td><td>{env.get('python', '?')}</td><td>{html.escape(str(env.get('device', '?')))}</td>"
                    f"<td>{html.escape(str(env.get('compute_dtype', 'float32' if env.get('device') == 'cpu' else '?')))}</td>"
                    f"<td>{html.escape(str(env.get('native_kernels', '-')))}</td>"
                    f"<td>{env.get('threads', '?')}</td><td>{html.escape(_ranks(info['config']))}</td>"
                    f"<td>{info['config'].get('seed', '?')}</td>"
                    f"<td>{html.escape(str(env.get('date', '?')))}</td></tr>")
    return ('<table class="grid small"><thead><tr><th>run</th><th>cnnlab</th><th>torch</th><th>python</th>'
            f'<th>device</th><th>compute dtype</th><th>native kernels</th><th>threads</th><th>ranks</th><th>seed</th><th>date</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{margin-bottom:4px} .sub{color:#666;margin-top:0}
table.grid{border-collapse:collapse;margin:12px 0;font-size:14px}
table.grid th,table.grid td{border:1px solid #ddd;padding:4px 8px;text-align:right}
table.grid th{background:#f3f5f8;cursor:pointer;user-select:none} table.grid td:first-child{text-align:left}
table.small{font-size:13px} .run{border-top:2px solid #e5e5e5;margin-top:28px;padding-top:8px}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start} figure{margin:0} figure img{max-width:560px;border:1px solid #eee}
figcaption{font-size:12px;color:#666} .seed{background:#fafaf0;border-left:4px solid #d8c96b;padding:6px 10px}
.failed{background:#fff0f0;border-left:4px solid #d66;padding:6px 10px}
"""
SORT_SCRIPT = """
function sortTable(col){const t=document.getElementById('runs'),b=t.tBodies[0],rows=[...b.rows];
const dir=t.dataset.col==String(col)&&t.dataset.dir=='asc'?'desc':'asc';t.dataset.col=col;t.dataset.dir=dir;
rows.sort((x,y)=>{const a=x.cells[col].dataset.v,c=y.cells[col].dataset.v,na=parseFloat(a),nc=parseFloat(c);
const r=(!isNaN(na)&&!isNaN(nc))?na-nc:a.localeCompare(c);return dir=='asc'?r:-r});rows.forEach(r=>b.appendChild(r));}
"""


def build_report(run_dirs: list[str | Path], output: str | Path, title: str = "cnnlab report",
                 failures: list[str] | None = None, log: Callable[[str], None] = print) -> Path:
    """Writes the report of the finished runs among ``run_dirs`` to ``output``; unfinished runs
    and ``failures`` are listed as such. Runs whose metrics.json predates ``METRICS_VERSION`` are
    scored again from their confusion matrices, which the page and one ``log`` line say."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    infos, unfinished = [], []
    for d in run_dirs:
        info = _run_info(Path(d))
        (infos.append(info) if info else unfinished.append(Path(d).name))
    if not infos and not failures:
        raise CnnlabError("no finished runs to report; pass run directories that hold metrics.json")

    def fig_html(fig) -> str:
        return pio.to_html(fig, full_html=False, include_plotlyjs=False, config={"displaylogo": False})

    notes = [f'<p class="failed">{html.escape(f)}</p>' for f in failures or []]
    rescored = [info["name"] for info in infos if info["rescored"]]
    if rescored:
        said = (f"{len(rescored)} run(s) ({', '.join(rescored)}) have a metrics.json from before cnnlab's F1 fix: "
                "their test precision, recall and F1 are recomputed from the confusion matrix (history.csv's "
                "val_f1 stays as it was written)")
        log(f"note: {said}")
        notes.append(f'<p class="failed">{html.escape(said)}</p>')
    notes += [f'<p class="failed">unfinished (not reported): {html.escape(n)} — continue it with '
              f'<code>cnnlab resume</code></p>' for n in unfinished]
    sections = []
    for info in infos:
        sections.append(f"""<section class="run" id="run-{html.escape(info['name'])}">
<h2>{html.escape(info['name'])} <small>({html.escape(info['kind'])}: {html.escape(str(info['model']))})</small></h2>
{_seed_note(info)}
{fig_html(_curves([info], f"{info['name']}: learning curves", overlay=False))}
<div class="row"><div>{fig_html(_confusion(info))}</div><div><h3>per class (test)</h3>{_per_class(info)}</div></div>
<div class="row">{_image(info['dir'] / 'samples.png', 'random training images')}
{_image(info['dir'] / 'mistakes.png', 'most confident mistakes: true → predicted, probability')}</div>
</section>""")
    overlay = fig_html(_curves(infos, "all runs: train dashed, validation solid, ★ best epoch", overlay=True)) \
        if infos else ""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style><script>{get_plotlyjs()}</script><script>{SORT_SCRIPT}</script></head><body>
<h1>{html.escape(title)}</h1><p class="sub">{len(infos)} runs · made {now} by cnnlab {__version__} on Python
{platform.python_version()} · accuracies are measured once on each run's held-out test split</p>
{''.join(notes)}
<h2>Runs side by side</h2><p class="sub">click a column to sort; the overfitting gap is train minus validation
accuracy at the best epoch; the last column is the original study's test accuracy where a run reproduces one</p>
{_table(infos)}
{overlay}
{''.join(sections)}
<h2>Environment</h2>{_environment(infos)}
</body></html>"""
    output = Path(output)
    if output.is_dir():
        raise CnnlabError(f"-o {output} is a folder; pass a file name such as {output / 'report.html'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output, page.encode())
    except (OSError, WriteError) as exc:
        raise CnnlabError(f"cannot write the report to {output} ({getattr(exc, 'strerror', None) or exc}); "
                          "pass -o a file in a writable folder") from None
    return output
