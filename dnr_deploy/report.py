"""dnr-report: one summary of a run and its deploy dir, read back from the files the stages
wrote (run.json, manifest.json, reports/bench.json, reports/verify.json) and never recomputed,
as a terminal table and a self-contained HTML page with the plots inline.

Reading only the JSON contracts keeps this module free of torch and onnxruntime: a report
opens in well under a second and works on a deploy dir copied away from its run.

What it reads are artifacts (DESIGN.md section 9): every file goes through `artifact_file`
(no symbolic link, nothing outside its folder), so a linked plot is never embedded; the run a
manifest names is read only when it is the deploy dir's own folder or a sibling of it; and the
page goes into the folder given (or `--html`), never into one an artifact names.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.config import option
from dnr_deploy.deploydir import names
from dnr_deploy.deploydir.manifest import format_classes
from dnr_deploy.deploydir.opening import source_run_dir
from dnr_deploy.deploydir.signing import SignatureError, check_signature
from dnr_deploy.files import artifact_file, read_json_object, write_atomic
from dnr_deploy.runtime.verdict import stage_label

REPORT_HTML = "report.html"
BENCH_JSON, VERIFY_JSON = "bench.json", "verify.json"
BENCH_PLOT, VERIFY_PLOT = "bench_latency.png", "verify_examples.png"
RUN_PLOTS = {"training.png": "training curves", "layer_densities.png": "per-layer density"}


class ReportError(ValueError):
    """Neither a run dir nor a deploy dir, or one of its JSON files is unreadable."""


@dataclass
class ReportConfig:
    path: str | None = option(
        None, 'run dir or deploy dir (default: the latest run and its deploy dir)')
    html: str | None = option(
        None, 'where to write the HTML page (default: RUN_DIR/report.html for a run dir, '
        'DEPLOY_DIR/reports/report.html for a deploy dir)')
    verify_key: str | None = option(
        None, "public key (PEM) whose private key must have signed the deploy dir (model.sig "
        "over every file): a missing or invalid signature, or any file changed or added after "
        "signing, is refused (exit 2)")


@dataclass
class Section:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, value: str) -> None:
        self.rows.append((label, value))


@dataclass
class Summary:
    run_dir: Path | None
    deploy_dir: Path | None
    sections: list[Section]
    plots: list[tuple[str, Path]]  # (caption, PNG), only regular files inside their folder
    home: Path | None = None  # the folder the page goes to by default: inside the dir given

    def as_dict(self) -> dict:
        return {"run_dir": _shown(self.run_dir), "deploy_dir": _shown(self.deploy_dir),
                "sections": {s.title: dict(s.rows) for s in self.sections},
                "plots": {caption: _shown(path) for caption, path in self.plots}}


def report(config: ReportConfig) -> tuple[Summary, Path]:
    """What `dnr-report` does: the summary, and the HTML page written from it."""
    summary = summarize(config.path, config.verify_key)
    return summary, write_html(summary, config.html)


def summarize(path: str | Path | None, verify_key: str | Path | None = None) -> Summary:
    """Find the run and deploy dir behind `path` and read what each stage recorded.

    `verify_key`: the deploy dir's signature must verify with it (`deploydir.signing`);
    without it, one `SignatureNotice` says the deploy dir is unsigned or was not checked.

    Raises:
        ReportError: `path` is neither, a JSON file in it cannot be read, or (with
            `verify_key`) the deploy dir has no valid signature.
    """
    given = Path(path) if path else _latest()
    # with a key, a deploy dir's signature is checked before its manifest is even parsed
    early = (_signature(given, verify_key) if verify_key is not None
             and (given / names.MANIFEST_NAME).is_file() else None)
    run_dir, deploy_dir = _locate(given)
    signature = early or (_signature(deploy_dir, verify_key) if deploy_dir is not None
                          else None)
    sections: list[Section] = []
    plots: list[tuple[str, Path | None]] = []
    if run_dir is not None:
        sections.append(_run_section(run_dir, _read(run_dir, ckpt.RUN_JSON, "a run.json")))
        plots += [(caption, _plot(run_dir, f"plots/{name}")) for name, caption in
                  RUN_PLOTS.items()]
    if deploy_dir is not None:
        manifest = _read(deploy_dir, names.MANIFEST_NAME, "a manifest")
        sections.append(_deploy_section(deploy_dir, manifest))
        sections[-1].add("signature", signature["status"])
        reports = names.REPORTS_DIR
        if (deploy_dir / reports / BENCH_JSON).is_file():
            sections.append(_bench_section(_read(deploy_dir, f"{reports}/{BENCH_JSON}",
                                                 "a bench.json")))
        if (deploy_dir / reports / VERIFY_JSON).is_file():
            sections.append(_verify_section(_read(deploy_dir, f"{reports}/{VERIFY_JSON}",
                                                  "a verify.json")))
        plots += [("latency (dnr-bench)", _plot(deploy_dir, f"{reports}/{BENCH_PLOT}")),
                  ("the deployed model under attack (dnr-verify)",
                   _plot(deploy_dir, f"{reports}/{VERIFY_PLOT}"))]
    home = given if run_dir == given else given / names.REPORTS_DIR
    return Summary(run_dir, deploy_dir, sections, [(c, p) for c, p in plots if p is not None],
                   home)


def _plot(folder: Path, name: str) -> Path | None:
    """A plot to embed: a regular file inside `folder`, else None (a symbolic link to
    /etc/passwd or /proc/self/environ is never read)."""
    try:
        path = artifact_file(folder, name, ReportError)
    except ReportError:
        return None
    return path if path.is_file() else None


def format_table(summary: Summary) -> str:
    width = max((len(label) for s in summary.sections for label, _ in s.rows), default=0)
    lines = []
    for section in summary.sections:
        lines.append(section.title)
        lines += [f"  {label:<{width}}  {value}" for label, value in section.rows]
    return "\n".join(lines)


def write_html(summary: Summary, out: str | Path | None) -> Path:
    """The page, written atomically: tables, then every plot as an inline PNG, so the one file
    can be mailed or attached to a CI run."""
    if out is None:
        home = summary.home or summary.run_dir or summary.deploy_dir / names.REPORTS_DIR
        out = _default_page(home)
    out = Path(out)
    tables = "\n".join(
        f"<h2>{html.escape(s.title)}</h2>\n<table>\n" + "\n".join(
            f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
            for label, value in s.rows) + "\n</table>" for s in summary.sections)
    figures = "\n".join(
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(caption)}'
        "</figcaption></figure>" for caption, path in summary.plots)
    title = html.escape(f"dnr-deploy report: {(summary.run_dir or summary.deploy_dir).name}")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ text-align: left; padding: 0.2em 1em 0.2em 0; border-bottom: 1px solid #ddd; }}
th {{ font-weight: normal; color: #555; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
img {{ max-width: 100%; }}
</style></head>
<body><h1>{title}</h1>
{tables}
<h2>Plots</h2>
{figures or "<p>no plots found</p>"}
</body></html>
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out


def _default_page(home: Path) -> Path:
    """home/report.html, refused when `home` (or the page) is a symbolic link: the default
    page is written only inside the dir given."""
    for path in (home, home / REPORT_HTML):
        if path.is_symlink():
            raise ReportError(f"{str(path)!r} is a symbolic link; dnr-report writes only "
                              "inside the dir given: name the page with --html")
    return home / REPORT_HTML


def _latest() -> Path:
    try:
        return ckpt.latest_run()
    except ckpt.CheckpointError as err:
        raise ReportError(str(err)) from None


def _locate(path: Path) -> tuple[Path | None, Path | None]:
    """(run dir, deploy dir) for a path that is either; the other one when it can be found
    (RUN_DIR/deploy, or the manifest's source run if it is still there)."""
    if (path / names.MANIFEST_NAME).is_file():
        manifest = _read(path, names.MANIFEST_NAME, "a manifest")
        return source_run_dir(path, (manifest.get("source_run") or {}).get("dir")), path
    if (path / ckpt.RUN_JSON).is_file():
        deploy = path / names.DEFAULT_OUT
        inside = not deploy.is_symlink() and (deploy / names.MANIFEST_NAME).is_file()
        return path, deploy if inside else None
    if (path / ckpt.CHECKPOINT_NAME).is_file():
        raise ReportError(f"{str(path)!r} is a run that has not finished (no run.json yet)")
    raise ReportError(f"{str(path)!r} is neither a run dir (run.json) nor a deploy dir "
                      f"({names.MANIFEST_NAME})")


def _signature(deploy_dir: Path, verify_key: str | Path | None) -> dict:
    try:
        return check_signature(deploy_dir, verify_key)
    except SignatureError as err:
        raise ReportError(str(err)) from None


def _read(folder: Path, name: str, what: str) -> dict:
    return read_json_object(artifact_file(folder, name, ReportError), what, ReportError)


def _run_section(run_dir: Path, run: dict) -> Section:
    section = Section(f"run: {_shown(run_dir)}")
    try:
        accuracy, eps = run.get("accuracy", {}), run["threat_model"]["eps"]
        section.add("network", f"{run['model']['name']}, {run['granularity']} "
                    f"({run.get('method', 'dnr')}), dataset {run['config'].get('dataset')}")
        if run.get("class_names"):
            section.add("classes", format_classes(run["class_names"]))
        section.add("density", f"{run['density']['achieved']:.4f} "
                    f"(target {run['density']['target']:g})")
        section.add("params", _params(run["params"]))
        section.add("MACs", _macs(run["macs"]))
        section.add(f"clean / PGD-20 (Linf eps {eps:g})",
                    f"{_pct(accuracy.get('clean'))} / {_pct(accuracy.get('pgd20'))}")
        images = (run.get("robustness") or {}).get("images")
        section.add("AutoAttack-grade worst case",
                    f"{_pct(accuracy.get('autoattack'))}"
                    + (f" on the first {images} test images" if images else ""))
    except (KeyError, TypeError) as err:
        raise ReportError(f"run.json in {str(run_dir)!r} lacks {err}") from None
    return section


def _deploy_section(deploy_dir: Path, manifest: dict) -> Section:
    section = Section(f"deploy dir: {_shown(deploy_dir)}")
    files = manifest.get("files") or {}
    section.add("files", ", ".join(f"{name} {entry.get('bytes', 0) / 1024:.1f} KiB"
                                   for name, entry in files.items()) or "none listed")
    if manifest.get("class_names"):
        section.add("classes", format_classes(manifest["class_names"]))
    parity = manifest.get("parity") or {}
    if "onnx_vs_torch_max_abs" in parity:
        section.add("export check", f"ONNX Runtime vs PyTorch max |diff| "
                    f"{parity['onnx_vs_torch_max_abs']:.2e}, argmax "
                    f"{parity.get('argmax_agree')}/{parity.get('n_images')}")
    if isinstance(manifest.get("params"), dict) and "deployed" in manifest["params"]:
        section.add("params", _params(manifest["params"]))
    return section


def _bench_section(bench: dict) -> Section:
    runtime = (bench.get("runtime") or {}).get("name", "ort")
    threads = (bench.get("session") or {}).get("intra_op_num_threads", "?")
    section = Section(f"dnr-bench ({runtime}, {threads} thread(s))")
    for name, model in (bench.get("models") or {}).items():
        timings = ", ".join(f"batch {b}: {t.get('p50_ms', float('nan')):.3f} ms"
                            for b, t in (model.get("latency") or {}).items()
                            if isinstance(t, dict))
        if timings:
            section.add(f"{model.get('file', name)} p50", timings)
    comparison = bench.get("comparison") or {}
    for batch, figures in (comparison.get("per_batch") or {}).items():
        section.add(f"speedup vs baseline, batch {batch}", f"{figures['speedup']:.2f}x")
    if "file_size_ratio" in comparison:
        section.add("file size vs baseline", f"{comparison['file_size_ratio']:.1f}x smaller")
    return section


def _verify_section(report: dict) -> Section:
    images = report.get("images") or {}
    accuracy, comparison = report.get("accuracy") or {}, report.get("comparison") or {}
    section = Section(f"dnr-verify ({(report.get('attack') or {}).get('name', '?')}, "
                      f"Linf eps {(report.get('threat_model') or {}).get('eps', '?')}, "
                      f"{images.get('first', '?')} of {images.get('of', '?')} test images)")
    section.add("clean (the artifact)", _pct(accuracy.get("clean")))
    for stage in report.get("stages") or []:
        section.add(f"after {stage_label(stage)}", _pct(stage.get("robust_after")))
    section.add("worst case", _pct(accuracy.get("robust")))
    if "reference" in comparison:
        section.add("training side's figure", _pct(comparison.get("reference")))
    verdict = "PASS" if comparison.get("passed") else "FAIL"
    if not comparison.get("gated", True):
        verdict = "not gated (--no-gate)"
    reasons = "; ".join(comparison.get("reasons") or [])
    section.add("gate", verdict + (f": {reasons}" if reasons else ""))
    return section


def _params(params: dict) -> str:
    return (f"{params['dense']:,} -> {params['deployed']:,} "
            f"({params['dense'] / max(params['deployed'], 1):.1f}x compression)")


def _macs(macs: dict) -> str:
    return (f"{macs['dense']:,} dense; {macs['executed']:,} executed "
            f"({macs['dense'] / max(macs['executed'], 1):.1f}x fewer), {macs['nonzero']:,} "
            f"nonzero ({macs['dense'] / max(macs['nonzero'], 1):.1f}x fewer)")


def _pct(value) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else "not measured"


def _shown(path: Path | None) -> str | None:
    """Relative to the working folder when below it, as compress prints its run dir."""
    if path is None:
        return None
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def to_json(summary: Summary) -> str:
    return json.dumps(summary.as_dict(), indent=2)
