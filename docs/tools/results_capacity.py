"""The capacity-by-compression table (benchmarks/capacity.py) for docs/results.md, and the
README's "choosing a density" paragraph written from it (issue 28)."""

from __future__ import annotations

import statistics

from results_page import LABELS, RESULTS, command_of, load, mean_std, pct, table

NAME = "capacity"
ORDER = ["dense", "dnr-gradual", "static", "magnitude", "dense+trades", "dnr-gradual+trades",
         "static+trades", "magnitude+trades"]
TITLES = {**LABELS, "dense": "dense PGD-AT", "dnr-gradual": "DNR irregular (default)",
          "dnr-gradual+trades": "DNR irregular, `--loss trades`",
          "static": "static random masks", "magnitude": "magnitude prune-then-finetune",
          "dense+trades": "dense, `--loss trades`",
          "static+trades": "static random masks, `--loss trades`",
          "magnitude+trades": "magnitude prune-then-finetune, `--loss trades`"}


def _same_loss_dense(methods: dict, method: str) -> list[dict] | None:
    """What a row is measured against: dense trained with the same loss (TRADES rows against
    dense TRADES, where it was run), else dense PGD-AT."""
    if method.endswith("+trades") and "1" in methods.get("dense+trades", {}):
        return methods["dense+trades"]["1"]
    return methods.get("dense", {}).get("1")


def _mean(rows: list[dict], key: str) -> float:
    return statistics.mean(row[key] for row in rows)


def _points(runs: list[dict], other: list[dict]) -> float:
    """AutoAttack-grade points of `runs` over `other`, seed means."""
    return 100 * (_mean(runs, "autoattack") - _mean(other, "autoattack"))


def _cells(data: dict):
    """(width, method, density, rows) for every measured cell, widest last."""
    for width in sorted(data["rows"], key=int):
        methods = data["rows"][width]
        for method in sorted(methods, key=lambda m: ORDER.index(m) if m in ORDER else 99):
            for density in sorted(methods[method], key=float, reverse=True):
                yield width, method, density, methods[method][density]


def capacity_section() -> str:
    data = load(NAME)
    rows = []
    for width, method, density, runs in _cells(data):
        dense = _same_loss_dense(data["rows"][width], method)
        gap = "-" if dense is None or method.startswith("dense") else \
            f"{_points(runs, dense):+.1f}"
        rows.append([width, f"{runs[0]['params_dense']:,}", TITLES.get(method, method),
                     f"{float(density):g} ({_mean(runs, 'compression'):.1f}x)", len(runs),
                     mean_std([r["clean"] for r in runs]), mean_std([r["pgd20"] for r in runs]),
                     f"**{mean_std([r['autoattack'] for r in runs])}**", gap,
                     f"{_mean(runs, 'train_s_per_epoch'):.0f}"])
    return "\n".join([
        "## Capacity by compression", "",
        command_of(data, NAME) + " The default net widened K-fold (`--model small:K`), "
        "embedded digits, eps 0.2, 20 epochs, 1 training thread a run; robust accuracy is the "
        "AutoAttack-grade ensemble on all 360 test images, mean +/- std over seeds, in %; "
        "vs dense is the AutoAttack-grade difference, in points, from dense of the same width "
        "trained with the same loss (TRADES rows against dense TRADES where it was run); "
        "s/epoch is the mean training time of an epoch of the runs as they were trained, "
        "beside other jobs (the width-1 runs beside several): only a record of those runs; "
        "the cost of a width is the last table of this section.", "",
        table(["width", "parameters (dense)", "method", "density (compression)", "seeds",
               "clean", "PGD-20", "AutoAttack-grade", "vs dense", "s/epoch"], rows),
        *_where_dnr_stops_leading(data), *_epoch_cost()]) + "\n"


def _where_dnr_stops_leading(data: dict) -> list[str]:
    """At 20x, by width: the weights left, DNR's gap to dense and its lead over each baseline
    (AutoAttack-grade points, seeds in brackets): where a wider net stops needing DNR's
    choice of weights."""
    base = data["rows"]["1"]["dense"]["1"][0]["params_dense"]
    rows = []
    for width in sorted(data["rows"], key=int):
        methods = data["rows"][width]
        dense, dnr = methods.get("dense", {}).get("1"), methods.get("dnr-gradual", {}).get("0.05")
        if not dense or not dnr:
            continue
        kept = dnr[0]["params_dense"] / _mean(dnr, "compression")
        leads = []
        for baseline in ("static", "magnitude"):
            runs = methods.get(baseline, {}).get("0.05")
            leads.append("-" if not runs else
                         f"{_points(dnr, runs):+.1f} "
                         f"({len(runs)})")
        rows.append([width, f"{kept:,.0f}", f"{kept / base:.2f}",
                     f"{_points(dnr, dense):+.1f} "
                     f"({len(dnr)} / {len(dense)})", *leads])
    return ["", "At 20x, by width: the weights DNR keeps, as a fraction of the dense width-1 "
            "net's parameters; DNR's AutoAttack-grade points against dense of the same width; "
            "and its lead over static random masks and over magnitude pruning (seeds in "
            "brackets). As the weights kept approach what a dense net needs for this task, the "
            "gap to dense closes and so does DNR's lead: placed at random, that many weights "
            "train about as robust.", "",
            table(["width", "weights kept at 20x", "of dense width 1", "DNR vs dense",
                   "DNR vs static", "DNR vs magnitude"], rows)]


def _epoch_cost() -> list[str]:
    """Seconds per epoch by width, timed in turns on a machine doing nothing else
    (benchmarks/training_cost.py --widths), or nothing if that was not run."""
    name = "training_cost_widths"
    if not (RESULTS / f"{name}.json").is_file():
        return []
    data = load(name)
    by_width: dict[int, dict] = {}
    for key, row in data["rows"].items():
        by_width.setdefault(row.get("width", 1), {})[key.split("@")[0]] = row
    first = min(by_width)
    base = by_width[first].get("dense", {}).get("fastest_epoch_s")
    rows = [[width, *(f"{methods[m]['fastest_epoch_s']:.1f}" if m in methods else "-"
                      for m in ("dense", "dnr-gradual")),
             f"{methods['dense']['fastest_epoch_s'] / base:.1f}x"
             if base and "dense" in methods else "-"]
            for width, methods in sorted(by_width.items())]
    return ["", "Seconds per training epoch by width, the runs taking turns with nothing else "
            "on the machine, each scored by its fastest epoch (1 thread, embedded digits, "
            "PGD-7 training): " + command_of(data, name), "",
            table(["width", "dense PGD-AT s/epoch", "DNR s/epoch", f"dense vs width {first}"],
                  rows)]


def _seeds(count: int, other: int) -> str:
    """How many seeds stand behind a comparison of two rows (of `count` and `other` seeds)."""
    if min(count, other) == 1:
        return "1 seed, so not yet a finding"
    return f"{count} seeds" if count == other else \
        f"{count} seeds against {other}, so not yet the 3-seed comparison"


def _closest_baseline(data: dict) -> str:
    """DNR's lead at 20x over the closer of static and magnitude pruning, width by width."""
    leads = []
    for width in sorted(data["rows"], key=int):
        methods = data["rows"][width]
        dnr = methods.get("dnr-gradual", {}).get("0.05")
        baselines = [methods[m]["0.05"] for m in ("static", "magnitude")
                     if "0.05" in methods.get(m, {})]
        if dnr and baselines:
            best = max(_mean(runs, "autoattack") for runs in baselines)
            leads.append(f"{100 * (_mean(dnr, 'autoattack') - best):+.1f} at width {width}")
    if not leads:
        return ""
    return ("DNR's lead over the closer of the two baselines, in points: "
            + ", ".join(leads) + " (seeds as above). ")


def _loss_by_compression(data: dict) -> str:
    """The points DNR loses against dense of its width at each measured compression, width by
    width: how far a network of that size for its task can go."""
    widths = []
    for width in sorted(data["rows"], key=int):
        methods = data["rows"][width]
        dense = methods.get("dense", {}).get("1")
        dnr = methods.get("dnr-gradual", {})
        if dense and len(dnr) > 1:
            steps = ", ".join(f"{_mean(runs, 'compression'):.0f}x {_points(dense, runs):.1f}"
                              for _, runs in sorted(dnr.items(), key=lambda i: -float(i[0])))
            widths.append(f"width {width}: {steps}")
    if not widths:
        return ""
    return ("The points DNR loses against dense of the same width, by compression (1 seed "
            "where not 3; negative: gained): " + "; ".join(widths) + ". ")


def density_guidance() -> str:
    """The README paragraph: what 20x costs at each measured width, from the table."""
    data = load(NAME)
    sentences = []
    for width in sorted(data["rows"], key=int):
        methods = data["rows"][width]
        dense = methods.get("dense", {}).get("1")
        dnr = methods.get("dnr-gradual", {}).get("0.05")
        if not dense or not dnr:
            continue
        gap = _points(dense, dnr)
        text = (f"at width {width} ({dense[0]['params_dense']:,} parameters) DNR at 20x "
                f"scored {pct(_mean(dnr, 'autoattack'))}% against dense PGD-AT's "
                f"{pct(_mean(dense, 'autoattack'))}% ({gap:.1f} points lost, "
                f"{_seeds(len(dnr), len(dense))})")
        for baseline, label in (("static", "static random masks"),
                                ("magnitude", "magnitude pruning")):
            runs = methods.get(baseline, {}).get("0.05")
            if runs:
                lead = _points(dnr, runs)
                text += (f", {abs(lead):.1f} points {'ahead of' if lead >= 0 else 'behind'} "
                         f"{label} ({_seeds(len(dnr), len(runs))})")
        trades = methods.get("dnr-gradual+trades", {}).get("0.05")
        if trades:
            text += (f", {pct(_mean(trades, 'autoattack'))}% with `--loss trades` (clean "
                     f"{pct(_mean(trades, 'clean'))}%)")
            dense_trades = methods.get("dense+trades", {}).get("1")
            if dense_trades:
                text += (f" against dense TRADES's {pct(_mean(dense_trades, 'autoattack'))}% "
                         f"({_seeds(len(dense_trades), len(trades))})")
        sentences.append(text)
    return ("On the embedded default (AutoAttack-grade accuracy, eps 0.2), "
            + "; ".join(sentences) + ". " + _loss_by_compression(data)
            + "A network near its task's size pays for every halving of its weights, where "
            "the paper's networks, hundreds of times larger than their tasks need, did not: "
            "the smaller your network is for its task, the lower the compression to start "
            "from, and "
            "`dnr-verify` tells what it cost. " + _closest_baseline(data) + "Every cell: "
            "[docs/results.md](docs/results.md#capacity-by-compression).\n")
