"""Training curves of one or more runs, from their metrics.jsonl, in one picture.

    python -m minilm.plot out-clm out-mlm out-t5 -o curves.png

Four panels, one line per run (the same colour in every panel): training loss, validation loss,
validation bits per byte, learning rate, each against the tokens seen (input tokens: a run's
`tokens` column, which trainer.py writes beside each row's step). Bits per byte do not depend on
the tokenizer, so runs with different vocabularies or objectives compare honestly there; the
losses of different objectives measure different things (a masked LM's loss is over its masked
tokens only).

What metrics.jsonl holds (minilm/trainer.py, Trainer._write_metrics): a row per log line,
{step, tokens, loss, lr, tokens_per_s, mfu}, and a row per evaluation, {step, tokens, val_loss,
val_bpb, ...} with whatever that objective reports (val_ppl, val_acc, val_mlm_loss, ...). A run
whose objective does not report a panel's number is left out of that panel, and a note on stderr
says so. Files written before the `tokens` column existed are plotted against steps (all runs then,
so the x axes agree).

matplotlib is an optional extra (pip install -e ".[plot]"); without it the command is one line
saying how to get it. The picture is drawn by the Agg backend on a Figure of its own: no pyplot,
so nothing changes in the plotting state of a notebook that calls plot_runs.
"""
from __future__ import annotations

import json
import math
import os
import sys

from minilm.errors import UserError

METRICS_NAME = "metrics.jsonl"   # as minilm/run_dir.py names it
# panel title -> the metrics.jsonl key it draws
PANELS = {"training loss": "loss", "validation loss": "val_loss", "validation bits per byte": "val_bpb",
          "learning rate": "lr"}
MATPLOTLIB_HINT = 'minilm.plot needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib)'


# ----------------------------------------------------------------------------- reading
def is_number(value) -> bool:
    """An int or float: not a bool (JSON's true is no loss) and not null. A NaN loss stays (a gap
    in its curve shows where a run diverged)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_position(value) -> bool:
    """A step or tokens value that can sit on the x axis: a finite number."""
    return is_number(value) and math.isfinite(value)


def metrics_row(line: bytes) -> dict | None:
    """One line of metrics.jsonl as a row, or None when it is not one: not UTF-8, not a JSON
    object, or without a finite step (or with a tokens column that is not one: null, say)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(row, dict) or not is_position(row.get("step")):
        return None
    if "tokens" in row and not is_position(row["tokens"]):
        return None
    return row


def read_metrics(run: str, log=None) -> list[dict]:
    """The rows of a run's metrics.jsonl (`run`: the run folder, or the file itself). Lines that
    are not metrics rows (metrics_row) are skipped and counted in a note on `log` (stderr by
    default)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    path = os.path.join(run, METRICS_NAME) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        where = f"{run} holds no {METRICS_NAME}" if os.path.isdir(run) else f"no run folder or {METRICS_NAME} at {run}"
        raise UserError(f"{where}; pass the --out_dir of a train.py run")
    rows, bad = [], 0
    with open(path, "rb") as f:   # bytes: a line that is not UTF-8 is skipped, not the whole file
        for line in f:
            if not line.strip():
                continue
            row = metrics_row(line)
            if row is not None:
                rows.append(row)
            else:
                bad += 1
    if bad:
        log(f"note: {path}: skipped {bad} line(s) that are not metrics rows")
    return rows


def curves(runs: dict[str, list[dict]], log=None) -> tuple[str, dict[str, dict[str, tuple[list, list]]]]:
    """(x axis: "tokens" or "step", {panel title: {run name: (xs, ys)}}) from each run's rows.

    Each curve is sorted by x, and a step logged twice (a crash between a log line and the
    checkpoint it resumed from, in files written before run_dir dropped such rows) keeps its last
    value. A run that lacks a panel's key is left out of that panel, with a note on `log`."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    old = [name for name, rows in runs.items() if any("tokens" not in row for row in rows)]
    x_key = "step" if old else "tokens"
    if old:
        log(f"note: {', '.join(old)} predate(s) the tokens column of metrics.jsonl; plotting against steps")
    panels: dict[str, dict[str, tuple[list, list]]] = {title: {} for title in PANELS}
    for title, key in PANELS.items():
        for name, rows in runs.items():
            points = {row[x_key]: row[key] for row in rows if is_number(row.get(key))}
            if points:
                xs = sorted(points)
                panels[title][name] = (xs, [points[x] for x in xs])
            else:
                log(f"note: {name} has no {key} (its objective does not report it, or it never evaluated); "
                    f"left out of '{title}'")
    return x_key, panels


def run_names(paths: list[str]) -> list[str]:
    """Short legend names: each run's folder name, or its whole path where two names clash."""
    names = [os.path.basename(os.path.normpath(p if os.path.isdir(p) else os.path.dirname(p) or ".")) for p in paths]
    return [n if names.count(n) == 1 else os.path.normpath(p) for n, p in zip(names, paths)]


# ----------------------------------------------------------------------------- drawing
def plot_runs(paths: list[str], out_path: str, log=None):
    """Draw the runs' curves into `out_path` (.png, .pdf, .svg: by its extension); returns the
    matplotlib Figure."""
    if not paths:
        raise UserError("name at least one run folder, e.g. python -m minilm.plot out -o curves.png")
    names = run_names(paths)
    if len(set(names)) < len(names):
        raise UserError(f"a run is named twice: {' '.join(paths)}")
    x_key, panels = curves({name: read_metrics(path, log) for name, path in zip(names, paths)}, log)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise UserError(MATPLOTLIB_HINT) from None
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    for axes, (title, lines) in zip(figure.subplots(2, 2).flat, panels.items()):
        axes.set_title(title)
        axes.set_xlabel("tokens seen" if x_key == "tokens" else "step")
        axes.xaxis.set_major_formatter(EngFormatter(sep=""))   # 1.5M, not 1500000
        axes.grid(alpha=0.3)
        for name, (xs, ys) in lines.items():
            axes.plot(xs, ys, color=colours[name], label=name, marker="o" if len(xs) == 1 else None)
        if not lines:
            axes.text(0.5, 0.5, f"no run reports {PANELS[title]}", ha="center", va="center",
                      transform=axes.transAxes, color="gray")
    figure.legend(*legend_entries(figure), loc="outside lower center", ncols=min(len(names), 4))
    try:
        figure.savefig(out_path, dpi=120)
    except ValueError as err:   # an extension matplotlib has no writer for
        raise UserError(f"cannot write {out_path}: {str(err).splitlines()[0]}; use .png, .pdf or .svg") from None
    except OSError as err:
        raise UserError(f"cannot write {out_path}: {err.strerror or err}") from None
    return figure


def legend_entries(figure):
    """One legend entry per run, from whichever panel holds its line."""
    seen = {}
    for axes in figure.axes:
        for line in axes.get_lines():
            seen.setdefault(line.get_label(), line)
    return list(seen.values()), list(seen)


# ----------------------------------------------------------------------------- command line
USAGE = "usage: python -m minilm.plot RUN_DIR [RUN_DIR ...] [-o curves.png]"


def parse_args(argv: list[str]) -> tuple[list[str], str]:
    """(run folders, output path). -o/--out names the picture (curves.png by default)."""
    runs, out, i = [], "curves.png", 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-o", "--out"):
            if i + 1 == len(argv):
                raise UserError(f"{arg} needs a file name; {USAGE}")
            out, i = argv[i + 1], i + 2
            continue
        if arg.startswith(("-o=", "--out=")):
            out = arg.partition("=")[2]
        elif arg.startswith("-"):
            raise UserError(f"unknown flag {arg}; {USAGE}")
        else:
            runs.append(arg)
        i += 1
    if not runs:
        raise UserError(f"name at least one run folder; {USAGE}")
    return runs, out


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nTraining loss, validation loss, validation bits per byte and learning rate against "
              "tokens seen, one line per run, from each run's metrics.jsonl.")
        return
    runs, out = parse_args(argv)
    plot_runs(runs, out)
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")


if __name__ == "__main__":
    from minilm.cli import run_cli
    run_cli(main)
