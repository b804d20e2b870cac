"""The report folder of a scan: report.json, trigger images, the summary figure
and a self-contained report.html (schema and layout: docs/report.md).

Images are drawn with Pillow; the HTML embeds them as data URIs so the one file
can be mailed or archived. JSON has no NaN/Infinity: non-finite numbers are
written as the strings "inf", "-inf", "nan".
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data import atomic_write, save_npz
from .detect import MAD_CONSISTENCY, true_median

# what each method's per-class statistic is (figure and table headings)
STATISTIC_NAMES = {"nc": "mask L1", "b3d": "mask L1", "b3d-ss": "mask L1", "lred": "1/||v||2",
                   "ured": "1/||v||2", "dtinspector": "transfer ratio"}


def statistic_name(entry: dict) -> str:
    option = entry.get("config", {}).get("statistic")
    if entry["method"] == "tabor":
        return "quality score" if option == "quality" else "mask L1"
    if entry["method"] == "pixel":
        return "ln(1 + perturbed pixels)" if option == "log_count" else "perturbed pixels"
    return STATISTIC_NAMES.get(entry["method"], "statistic")


# ---------------------------------------------------------------------------
# Files in the folder
# ---------------------------------------------------------------------------
def method_file(out: Path, method: str) -> Path:
    return Path(out) / "results" / f"{method}.json"


def checkpoint_file(out: Path, method: str) -> Path:
    return Path(out) / "checkpoints" / f"{method}.pt"


def to_json(value) -> str:
    return json.dumps(_finite(value), indent=2, allow_nan=False, default=str) + "\n"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_method(out: Path, method: str) -> dict | None:
    """A finished method's saved entry ({"identity", "entry"}), or None."""
    path = method_file(out, method)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"--out: {path} is damaged ({exc}); delete it to scan that method again") from None
    if not isinstance(saved, dict) or "entry" not in saved:
        raise ValueError(f"--out: {path} is not a trigscan method result; delete it to scan again")
    return saved


def save_method(out: Path, method: str, identity: dict, entry: dict, result) -> None:
    """Triggers as arrays, then the entry: once the entry exists the method is finished."""
    (Path(out) / "triggers").mkdir(parents=True, exist_ok=True)
    arrays = {f"{_row_name(c)}_{key}": value for c in result.per_class for key, value in c.trigger.items()}
    if arrays:
        save_npz(Path(out) / "triggers" / f"{method}.npz", **arrays)
    path = method_file(out, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, to_json({"identity": identity, "entry": entry}).encode())


def write_report(out: Path, report: dict) -> None:
    out = Path(out)
    atomic_write(out / "summary.png", summary_png(report["results"]))
    atomic_write(out / "report.html", render_html(report, out).encode())
    atomic_write(out / "report.json", to_json(report).encode())


# ---------------------------------------------------------------------------
# One method's entry and its images
# ---------------------------------------------------------------------------
def _row_name(c) -> str:
    return f"class{c.target}" if c.source is None else f"pair{c.source}to{c.target}"


def method_entry(out: Path, result, example_images: torch.Tensor, labels) -> dict:
    """report.json's entry for one method; writes the method's trigger PNGs."""
    entry = result.to_dict()
    flagged_pairs = {tuple(p) for p in result.anomaly.details.get("flagged_pairs", [])}
    values = list(result.anomaly.values)
    for i, (row, c) in enumerate(zip(entry["per_class"], result.per_class)):
        row["flagged"] = ((c.source, c.target) in flagged_pairs if flagged_pairs
                          else c.source is None and c.target in result.targets)
        if len(values) == len(result.per_class):
            row["anomaly_value"] = values[i]
    entry["anomaly"]["statistic_threshold"] = statistic_threshold(entry)
    folder = Path(out) / "images" / result.method
    folder.mkdir(parents=True, exist_ok=True)
    for row, c in zip(entry["per_class"], result.per_class):
        x = _example(example_images, labels, c)
        pictures = trigger_pictures(c.trigger, x)
        row["images"] = {}
        for kind, array in pictures.items():
            name = f"{_row_name(c)}_{kind}.png"
            atomic_write(folder / name, png_bytes(array))
            row["images"][kind] = f"images/{result.method}/{name}"
    return entry


def _example(images: torch.Tensor, labels, c) -> torch.Tensor:
    """An image to stamp: the first of the row's source class, else of another class than the target."""
    if labels is not None:
        wanted = (labels == c.source) if c.source is not None else (labels != c.target)
        idx = wanted.nonzero().flatten()
        if idx.numel():
            return images[int(idx[0])].detach().cpu().float()
    return images[0].detach().cpu().float()


def trigger_pictures(trigger: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """mask, pattern and stamped example as [C, H, W] in [0, 1] for any method's trigger."""
    t = {k: v.detach().cpu().float() for k, v in trigger.items()}
    if "mask" in t and "pattern" in t:
        m, p = t["mask"], t["pattern"]
        return {"mask": m, "pattern": p, "stamped": ((1 - m) * x + m * p).clamp(0, 1)}
    if "positive" in t and "negative" in t:  # PixelBackdoor: a signed pixel perturbation
        delta = t["positive"] - t["negative"]
        return {"mask": (delta.abs().sum(0, keepdim=True) > 0).float(), "pattern": _signed(delta),
                "stamped": (x + delta).clamp(0, 1)}
    if "perturbation" in t:  # L-RED: an additive pattern
        v = t["perturbation"]
        magnitude = v.abs().sum(0, keepdim=True)
        return {"mask": magnitude / magnitude.max().clamp_min(1e-12), "pattern": _signed(v),
                "stamped": (x + v).clamp(0, 1)}
    pictures = {}
    for key, value in t.items():  # an unknown trigger: show its image-shaped tensors
        if value.dim() == 3 and value.shape[0] in (1, 3):
            lo, hi = value.min(), value.max()
            pictures[key] = (value - lo) / (hi - lo).clamp_min(1e-12)
    return pictures


def _signed(v: torch.Tensor) -> torch.Tensor:
    """A signed perturbation shown around mid-grey, scaled to its largest entry."""
    return (0.5 + 0.5 * v / v.abs().max().clamp_min(1e-12)).clamp(0, 1)


def png_bytes(array: torch.Tensor) -> bytes:
    a = (array.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# The anomaly threshold in the statistic's own units
# ---------------------------------------------------------------------------
def plotted_statistics(entry: dict) -> tuple[list[str], list[float], list[bool]]:
    """What the anomaly test ran over: labels, values, flagged (per class, or per
    target for a per-target verdict such as PixelBackdoor's pair_verdict="targets")."""
    details = entry["anomaly"].get("details") or {}
    if "target_statistics" in details:
        targets = details["targets"]
        return ([str(t) for t in targets], list(details["target_statistics"]),
                [t in entry["targets"] for t in targets])
    rows = entry["per_class"]
    labels = [str(r["class"]) if r.get("source") is None else f"{r['source']}→{r['class']}" for r in rows]
    return labels, [r["statistic"] for r in rows], [bool(r.get("flagged")) for r in rows]


def statistic_threshold(entry: dict) -> float | None:
    """The statistic value beyond which an entry is flagged: for MAD,
    median ∓ threshold·1.4826·MAD (low/high side); for L-RED's Gamma test, the
    value whose order-statistic p-value equals the threshold. None when undefined."""
    anomaly = entry["anomaly"]
    _, values, _ = plotted_statistics(entry)
    values = [float(v) for v in values]
    if anomaly["kind"] == "mad" and len(values) >= 2:
        med = true_median(values)
        mad = MAD_CONSISTENCY * true_median([abs(v - med) for v in values])
        side = anomaly.get("side", "low")
        if side == "both":
            return None
        return med - anomaly["threshold"] * mad if side == "low" else med + anomaly["threshold"] * mad
    if anomaly["kind"] == "gamma":
        shape, scale = (anomaly.get("details") or {}).get("shape"), (anomaly.get("details") or {}).get("scale")
        if not shape or not scale or not math.isfinite(shape):
            return None
        from scipy import stats

        # a calibrated test flags where the plain p-value falls below its raw level
        level = (anomaly.get("details") or {}).get("raw_level")
        level = anomaly["threshold"] if level is None else level
        return float(stats.gamma.ppf((1 - level) ** (1 / len(values)), shape, scale=scale))
    return None


# ---------------------------------------------------------------------------
# The summary figure
# ---------------------------------------------------------------------------
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def summary_png(entries: list[dict]) -> bytes:
    """One panel per method: the statistic per class as bars (flagged in red,
    not converged pale), the anomaly threshold as a dashed line."""
    panel_h, margin_l, margin_r = 230, 70, 20
    widths = [max(420, margin_l + margin_r + 34 * len(plotted_statistics(e)[0])) for e in entries]
    width = max(widths) if widths else 420
    image = Image.new("RGB", (width, max(1, panel_h * len(entries))), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    for i, entry in enumerate(entries):
        top = i * panel_h
        labels, values, flagged = plotted_statistics(entry)
        values = [float(v) for v in values]
        per_class = entry["per_class"]
        converged = ([bool(r["converged"]) for r in per_class] if len(per_class) == len(values)
                     else [True] * len(values))
        threshold = entry["anomaly"].get("statistic_threshold")
        verdict = "BACKDOORED, target(s) " + ", ".join(map(str, entry["targets"])) if entry["backdoored"] else "clean"
        name = statistic_name(entry)
        draw.text((10, top + 6), f"{entry['method']}: {verdict}", fill="#b00020" if entry["backdoored"] else "#1b5e20",
                  font=font)
        finite = [v for v in values if math.isfinite(v)]
        vmin = min([0.0] + finite)
        if threshold is not None and not (math.isfinite(threshold) and threshold >= vmin):
            thr_text, threshold = f"; flag threshold {threshold:.4g} lies below every value", None
        else:
            thr_text = "" if threshold is None else f"; dashed: flag threshold {threshold:.4g}"
        draw.text((10, top + 26), f"{name} per class{thr_text}", fill="#333333", font=small)
        x0, y0, y1 = margin_l, top + 48, top + panel_h - 30
        vmax = max(finite + ([] if threshold is None else [threshold]) + [vmin + 1e-12])
        scale = (y1 - y0) / ((vmax - vmin) * 1.08 or 1.0)
        base_y = y1 - (0 - vmin) * scale
        draw.line([(x0, y0), (x0, y1)], fill="#888888")
        draw.line([(x0, base_y), (width - margin_r, base_y)], fill="#888888")
        for value, text in ((vmax, f"{vmax:.3g}"), (vmin, f"{vmin:.3g}")):
            y = y1 - (value - vmin) * scale
            draw.text((x0 - 6, y), text, fill="#333333", font=small, anchor="rm")
        step = (width - margin_l - margin_r) / max(1, len(values))
        for j, (label, value) in enumerate(zip(labels, values)):
            left = x0 + j * step + step * 0.15
            right = x0 + (j + 1) * step - step * 0.15
            v = value if math.isfinite(value) else vmax
            y = y1 - (v - vmin) * scale
            colour = "#d32f2f" if flagged[j] else ("#4a78b5" if converged[j] else "#b8c7dd")
            draw.rectangle([left, min(y, base_y), right, max(y, base_y)], fill=colour)
            draw.text(((left + right) / 2, y1 + 4), label, fill="#333333", font=small, anchor="mt")
        if threshold is not None:
            y = y1 - (threshold - vmin) * scale
            for xs in range(int(x0), width - margin_r, 10):
                draw.line([(xs, y), (min(xs + 5, width - margin_r), y)], fill="#e65100", width=2)
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# report.html
# ---------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 6px}
.verdict{display:inline-block;padding:6px 12px;border-radius:6px;font-weight:600;margin:8px 0}
.bad{background:#fde0e0;color:#b00020} .ok{background:#e3f3e4;color:#1b5e20}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right} th{background:#f4f4f4}
td.l,th.l{text-align:left} tr.flag td{background:#fff0f0;font-weight:600}
img.t{width:72px;height:72px;image-rendering:pixelated;border:1px solid #ccc;vertical-align:middle}
.meta td{text-align:left} .small{font-size:12px;color:#555}
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _num(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if math.isfinite(v) else str(v)
    return html.escape(str(v))


def render_html(report: dict, out: Path) -> str:
    esc = html.escape
    model, data = report["model"], report["data"]
    bad = report["backdoored"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>trigscan report</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>trigscan report</h1><div class='small'>trigscan {esc(report['trigscan_version'])}, "
             f"report schema {report['schema_version']}</div>",
             f"<div class='verdict {'bad' if bad else 'ok'}'>"
             + (f"BACKDOORED — target class(es) {esc(', '.join(map(str, report['targets'])))}" if bad
                else "No backdoor found") + "</div>",
             "<table class='meta'>",
             f"<tr><th class='l'>model</th><td>{esc(str(model['path']))} ({esc(model['access'])}-box, "
             f"{esc(model.get('format', ''))}, {model.get('num_classes')} classes)<br>"
             f"<span class='small'>sha256 {esc(model['sha256'])}</span></td></tr>",
             f"<tr><th class='l'>data</th><td>{esc(str(data['path']))} ({data['n']} images)"
             + (f"<br><span class='small'>sha256 {esc(data['sha256'])}</span>" if data.get("sha256") else "")
             + "</td></tr>",
             f"<tr><th class='l'>scan</th><td>seed {report['scan']['seed']}, device {esc(report['scan']['device'])}, "
             f"classes {esc(str(report['scan']['classes'] or 'all'))}"
             + (f", query budget {report['scan']['budget']}" if report["scan"]["budget"] else "") + "</td></tr>",
             "</table>"]
    summary = out / "summary.png"
    if summary.exists():
        parts.append(f"<h2>Summary</h2><img alt='statistic per class' src='{_data_uri(summary)}'>")
    for entry in report["results"]:
        a = entry["anomaly"]
        verdict = (f"BACKDOORED — target(s) {', '.join(map(str, entry['targets']))}" if entry["backdoored"]
                   else "clean")
        test = (f"MAD anomaly index, threshold {_num(a['threshold'])} ({a.get('side', 'low')} side)"
                if a["kind"] == "mad" else
                f"Gamma order-statistic test, p-value {_num(a.get('p_value'))} (threshold {_num(a['threshold'])})"
                + (f", calibrated; plain p-value {_num(a['details']['order_statistic_p_value'])}"
                   if "raw_level" in (a.get("details") or {}) else "")
                if a["kind"] == "gamma" else f"{esc(a['kind'])}, threshold {_num(a['threshold'])}")
        parts.append(f"<h2>{esc(entry['method'])}</h2><div class='verdict {'bad' if entry['backdoored'] else 'ok'}'>"
                     f"{esc(verdict)}</div><div class='small'>{test}; "
                     f"{entry['elapsed_s']:.1f} s" + (f"; {entry['queries']} queries" if entry.get("queries") else "")
                     + ("; <b>partial</b>" if entry.get("partial") else "")
                     + "</div>" + "".join(f"<div class='small'>note: {esc(n)}</div>" for n in entry.get("notes", [])))
        pair = any(r.get("source") is not None for r in entry["per_class"])
        head = (("<th>source</th>" if pair else "") + f"<th>class</th><th>{esc(statistic_name(entry))}</th>"
                "<th>anomaly</th><th>ASR</th><th>converged</th><th>steps</th><th>queries</th>"
                "<th class='l'>mask</th><th class='l'>pattern</th><th class='l'>stamped</th>")
        rows = []
        for r in entry["per_class"]:
            images = "".join(f"<td class='l'><img class='t' alt='{k}' src='{_data_uri(out / r['images'][k])}'></td>"
                             if k in r.get("images", {}) else "<td></td>" for k in ("mask", "pattern", "stamped"))
            rows.append(f"<tr class='{'flag' if r.get('flagged') else ''}'>"
                        + (f"<td>{_num(r.get('source'))}</td>" if pair else "")
                        + f"<td>{r['class']}</td><td>{_num(r['statistic'])}</td><td>{_num(r.get('anomaly_value'), 3)}</td>"
                        f"<td>{_num(r['asr'], 3)}</td><td>{_num(r['converged'])}</td><td>{r['steps']}</td>"
                        f"<td>{r['queries']}</td>{images}</tr>")
        parts.append(f"<table><tr>{head}</tr>{''.join(rows)}</table>")
    parts.append("<p class='small'>Flagged rows are highlighted. Files beside this report: report.json "
                 "(schema in docs/report.md), images/, triggers/ (arrays).</p></body></html>")
    return "\n".join(parts)
