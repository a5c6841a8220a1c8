"""The grid's table: every finished cell under OUT, grouped by pair and method over seeds, written as table.md,
results.csv and (with matplotlib installed) table.png."""
import csv
import importlib.util
import io
import statistics
import time
from pathlib import Path

from rankkd.recipes import CIFAR100_PAIRS, CIFAR100_PUBLISHED_TOP1
from rankkd.training.checkpoint import write_atomically
from rankkd.grid.cells import BASE_METHODS, DEMO_PAIRS, Cell, pair_models, read_json, read_metrics
from rankkd.training.progress import format_duration
from rankkd.training.run_folder import RunLock

CSV_COLUMNS = ("pair", "teacher", "student", "method", "rank_k", "rank_topk", "seeds", "epochs",
               "top1_best_mean", "top1_best_std", "top1_last_mean", "top1_last_std", "tau_mean", "teacher_top1",
               "time_per_run_s", "published_top1", "rank_gain_best", "rank_gain_last")


def finished_cells(out):
    """(Cell, its metrics records) for every finished cell folder under `out`: the records up to the epochs it
    finished (a cell that a larger --epochs reopened counts as its finished run until it finishes again)."""
    cells = []
    for done in sorted(Path(out).glob("*/*/seed*/done.json")):
        marker, description = read_json(done), read_json(done.parent / "cell.json")
        if marker is None or description is None:
            continue  # unreadable markers: the runner runs the cell again, which rewrites them
        records = [record for record in read_metrics(done.parent) if record["epoch"] <= marker["epochs"]]
        if records:
            cells.append((Cell(**description["cell"]), records))
    return cells


def grouped_runs(out):
    """The finished runs by (pair, method, rank_k, rank_topk, epochs), in the table's order: the pairs and methods
    as the recipes list them. Runs of different lengths (a short trial, then the full grid) are different rows."""
    groups = {}
    for cell, records in finished_cells(out):
        key = (cell.pair, cell.method, cell.rank_k, cell.rank_topk, records[-1]["epoch"])
        groups.setdefault(key, []).append(records)
    pair_order = {pair: index for index, pair in enumerate([*CIFAR100_PAIRS, *DEMO_PAIRS])}
    method_order = {method: index for index, method in enumerate(
        [f"{base}{suffix}" for base in BASE_METHODS for suffix in ("", "+rank")])}
    keys = sorted(groups, key=lambda key: (pair_order.get(key[0], len(pair_order)), key[0], method_order[key[1]],
                                           key[2] or 0.0, key[3] or 0, key[4]))
    return [(key, groups[key]) for key in keys]


def table_rows(out, published_baselines):
    """One row per (pair, method with its ranking options): the CSV_COLUMNS, numbers as floats (None when absent)."""
    rows = []
    for key, runs in grouped_runs(out):
        rows.append(table_row(key, runs, published_baselines))
        pair, method, _, _, epochs = key
        base = method.removesuffix("+rank")
        if method != base:  # the base method's row sorts before its +rank rows
            baseline = next((row for row in rows
                             if row["pair"] == pair and row["method"] == base and row["epochs"] == epochs), None)
            if baseline is not None:
                rows[-1]["rank_gain_best"] = rows[-1]["top1_best_mean"] - baseline["top1_best_mean"]
                rows[-1]["rank_gain_last"] = rows[-1]["top1_last_mean"] - baseline["top1_last_mean"]
    return rows


def table_row(key, runs, published_baselines):
    pair, method, rank_k, rank_topk, epochs = key
    best = [max(record["val_top1"] for record in records) for records in runs]
    last = [records[-1]["val_top1"] for records in runs]
    taus = [records[-1]["val_tau"] for records in runs if records[-1].get("val_tau") is not None]
    teacher_top1 = [records[-1]["teacher_top1"] for records in runs if records[-1].get("teacher_top1") is not None]
    teacher, student = pair_models(pair)
    return {
        "pair": pair, "teacher": teacher, "student": student, "method": method, "rank_k": rank_k,
        "rank_topk": rank_topk, "seeds": len(runs), "epochs": epochs,
        "top1_best_mean": statistics.fmean(best), "top1_best_std": stdev(best),
        "top1_last_mean": statistics.fmean(last), "top1_last_std": stdev(last),
        "tau_mean": statistics.fmean(taus) if taus else None,
        "teacher_top1": statistics.fmean(teacher_top1) if teacher_top1 else None,
        "time_per_run_s": statistics.fmean(sum(record["epoch_time_s"] for record in records) for records in runs),
        "published_top1": CIFAR100_PUBLISHED_TOP1.get(pair, {}).get(method) if published_baselines else None,
        "rank_gain_best": None, "rank_gain_last": None,
    }


def variant(row):
    """A table row's method with its ranking-loss options, as Cell.variant names them."""
    return Cell(row["pair"], row["method"], 0, row["rank_k"], row["rank_topk"]).variant


def stdev(values):
    """The sample standard deviation, None for a single value."""
    return statistics.stdev(values) if len(values) > 1 else None


def mean_std(mean, std):
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def markdown_table(rows, grid, progress, chart_note=""):
    options = f" Options of every run: {' '.join(grid['trainer_args'])}." if grid["trainer_args"] else ""
    lines = [
        "# Logit distillation with and without the Kendall ranking loss", "",
        f"Data: {grid['data']}.{options} {progress}. Written {time.strftime('%Y-%m-%d %H:%M:%S')}.{chart_note}", "",
        "Top-1 (%) on the validation set, mean ± standard deviation over the finished seeds: *best* is each run's "
        "best epoch, *last* its final epoch. τ: mean Kendall τ-b between student and teacher logits (final epoch). "
        "Time: training and evaluation per run. Published: mdistiller's README (240 epochs, no ranking loss). "
        "+rank gain: the row's mean top-1 minus its base method's, same pair (best / last).", "",
        "| pair | teacher → student | method | seeds | epochs | top-1 best | top-1 last | τ | teacher top-1 "
        "| time per run | published | +rank gain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(markdown_columns(row)) + " |" for row in rows]
    if not rows:
        lines.append("| (no finished run yet) |" + " |" * 11)
    return "\n".join(lines) + "\n"


def markdown_columns(row):
    return [row["pair"], f"{row['teacher']} → {row['student']}", variant(row), str(row["seeds"]), str(row["epochs"]),
            mean_std(row["top1_best_mean"], row["top1_best_std"]),
            mean_std(row["top1_last_mean"], row["top1_last_std"]),
            "" if row["tau_mean"] is None else f"{row['tau_mean']:.3f}",
            "" if row["teacher_top1"] is None else f"{row['teacher_top1']:.2f}",
            format_duration(row["time_per_run_s"]),
            "" if row["published_top1"] is None else f"{row['published_top1']:.2f}",
            "" if row["rank_gain_best"] is None else f"{row['rank_gain_best']:+.2f} / {row['rank_gain_last']:+.2f}"]


def csv_text(rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def plot(rows, path, data):
    """A grouped bar chart of the best-epoch top-1 per pair (one bar per method, the std over seeds as error bars),
    with mdistiller's published KD and DKD numbers marked on their bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(row["pair"] for row in rows))
    several_lengths = len({row["epochs"] for row in rows}) > 1

    def label(row):
        return variant(row) + (f" ({row['epochs']} epochs)" if several_lengths else "")
    bar_labels = list(dict.fromkeys(label(row) for row in rows))
    width = 0.8 / len(bar_labels)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(pairs) * max(1, len(bar_labels) / 4)), 4.5))
    heights, labelled = [], False
    for index, bar_label in enumerate(bar_labels):
        xs, ys, errors, published = [], [], [], []
        for row in rows:
            if label(row) != bar_label:
                continue
            x = pairs.index(row["pair"]) - 0.4 + width * (index + 0.5)
            xs.append(x)
            ys.append(row["top1_best_mean"])
            errors.append(row["top1_best_std"] or 0.0)
            if row["published_top1"] is not None:
                published.append((x, row["published_top1"]))
        axes.bar(xs, ys, width, yerr=errors if any(errors) else None, capsize=2, label=bar_label)
        heights += ys + [value for _, value in published]
        if published:
            axes.scatter(*zip(*published), marker="_", s=200, color="black", zorder=3,
                         label=None if labelled else "published (mdistiller)")
            labelled = True
    low, high = min(heights), max(heights)
    axes.set_ylim(max(0.0, low - max(2.0, 0.3 * (high - low))), min(100.0, high + max(1.0, 0.1 * (high - low))))
    axes.set_xticks(range(len(pairs)), pairs, rotation=30, ha="right")
    axes.set_ylabel("top-1 (%), best epoch")
    data_name = "demo digits" if data == "demo" else Path(data).name
    axes.set_title(f"top-1, mean over seeds ({data_name})", fontsize="medium")
    axes.legend(fontsize="small", ncol=min(4, len(bar_labels) + 1), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    figure.tight_layout()
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=120))
    plt.close(figure)


def write_table(out, grid, progress):
    """Rewrite table.md, results.csv and table.png in `out` from its finished cells, under a lock so that the
    processes sharing the grid write one after another. Returns the rows and the table's text."""
    with RunLock(out, wait=True, what="the table of", name=".table.lock"):
        rows = table_rows(out, grid["published_baselines"])
        chart_note = ""
        if not matplotlib_installed():
            chart_note = " The chart table.png is skipped: matplotlib is not installed."
        elif rows:
            try:
                plot(rows, out / "table.png", grid["data"])
            except Exception as error:  # a chart is not worth the runs that a crash of the runner would stop
                chart_note = f" The chart table.png could not be drawn: {type(error).__name__}: {error}."
        if chart_note:
            (out / "table.png").unlink(missing_ok=True)  # an old chart would disagree with the table
        text = markdown_table(rows, grid, progress, chart_note)
        write_atomically(out / "table.md", lambda file: file.write(text.encode()))
        write_atomically(out / "results.csv", lambda file: file.write(csv_text(rows).encode()))
    return rows, text


def matplotlib_installed():
    return importlib.util.find_spec("matplotlib") is not None
