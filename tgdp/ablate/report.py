"""The study's outputs: ``ablation.json``, ``ablation.md`` and ``ablation.png``.

Per variant: mean ± std over seeds of retrieval R@1 / R@5 / R@10 (V→A and A→V) and the probe, the
counted FLOPs per step, and for every variant but the baseline the paired difference to the
baseline with its 95 % t-interval (:func:`tgdp.ablate.stats.paired_ci`).
"""

from __future__ import annotations

import io
from pathlib import Path

from tgdp.ablate.stats import mean_std, paired_ci
from tgdp.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["METRICS", "metric_values", "summarize", "format_markdown", "plot_study", "loss_curve", "write_outputs"]

# key -> (label, how to read it from a run result)
METRICS = {
    "v2a_R@1": ("V→A R@1", ("retrieval", "v2a", "R@1")),
    "a2v_R@1": ("A→V R@1", ("retrieval", "a2v", "R@1")),
    "v2a_R@5": ("V→A R@5", ("retrieval", "v2a", "R@5")),
    "a2v_R@5": ("A→V R@5", ("retrieval", "a2v", "R@5")),
    "v2a_R@10": ("V→A R@10", ("retrieval", "v2a", "R@10")),
    "a2v_R@10": ("A→V R@10", ("retrieval", "a2v", "R@10")),
    "probe": ("probe", ("probe", "value")),
}
CI_METRICS = ("v2a_R@1", "a2v_R@1", "v2a_R@5", "a2v_R@5", "probe")
RESOLVE_POINTS = 3.0


def _get(result: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(result, dict) or result.get(key) is None:
            return None
        result = result[key]
    return float(result)


def metric_values(results: dict[int, dict], key: str) -> dict[int, float]:
    """seed -> value of ``key`` (runs without it, e.g. no probe, are left out)."""
    path = METRICS[key][1]
    return {s: v for s, r in results.items() if (v := _get(r, path)) is not None}


def summarize(variants: dict[str, dict], baseline: str, settings: dict) -> dict:
    """variants: name -> {"overrides", "description", "flops", "results": {seed: result}}."""
    out = {"settings": {**settings, "baseline": baseline,
                        "ci": "95 % paired t-interval over seeds: mean(d) ± t(0.975, n-1) · std(d) / sqrt(n), "
                              "d = variant - baseline per seed",
                        "resolve_points": RESOLVE_POINTS},
           "variants": {}}
    base_results = variants[baseline]["results"] if baseline in variants else {}
    for name, v in variants.items():
        res = v["results"]
        entry = {"description": v["description"], "overrides": v["overrides"], "flops": v["flops"],
                 "seeds_done": sorted(res), "metrics": {}, "vs_baseline": {}, "runs": {str(s): res[s] for s in sorted(res)}}
        for key in METRICS:
            vals = metric_values(res, key)
            if vals:
                entry["metrics"][key] = mean_std([vals[s] for s in sorted(vals)])
        if name != baseline:
            for key in CI_METRICS:
                a, b = metric_values(res, key), metric_values(base_results, key)
                if set(a) & set(b):
                    entry["vs_baseline"][key] = paired_ci(a, b, resolve=RESOLVE_POINTS)
        out["variants"][name] = entry
    return out


def _pm(m: dict | None, digits: int = 2) -> str:
    if not m or m.get("mean") is None:
        return "–"
    if m.get("std") is None:
        return f"{m['mean']:.{digits}f}"
    return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}"


def _ci(c: dict | None) -> str:
    if not c or c.get("mean") is None:
        return "–"
    if c.get("half_width") is None:
        return f"{c['mean']:+.2f} (n={c['n']}, no CI)"
    mark = " *" if c["excludes_zero"] else ""
    return f"{c['mean']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]{mark}"


def format_markdown(summary: dict) -> str:
    st, vs = summary["settings"], summary["variants"]
    base = st["baseline"]
    lines = ["# Ablation", ""]
    if st.get("command"):
        lines += ["```bash", st["command"], "```", ""]
    lines += [f"Data: {st.get('data')} (training), {st.get('val_data')} ({st.get('num_val', '?')} held-out clips, "
              f"{st.get('num_frames', '?')} frames each); preset {st.get('preset')}, {st.get('steps')} steps at "
              f"batch {st.get('batch')} for every run; seeds {st.get('seeds')} (seed s: the same initial weights, "
              "data order and reconstruction masks in every variant). Time of the runs (train + evaluation, "
              f"summed): {st.get('wall_s', 0) / 60:.1f} min on {st.get('device', '?')}, {st.get('jobs', 1)} at once; "
              f"wall time of the last invocation: {st.get('invocation_wall_s', 0) / 60:.1f} min.", "",
              "Mean ± std over seeds (percent). GFLOP/step: counted by `tgdp.flops` (teacher forward + student "
              "forward and backward, × batch).", "",
              "| variant | seeds | GFLOP/step | V→A R@1 | A→V R@1 | V→A R@5 | A→V R@5 | V→A R@10 | A→V R@10 | probe |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in vs.items():
        m = v["metrics"]
        fl = v.get("flops") or {}
        gf = f"{fl['per_step'] / 1e9:.1f}" if fl.get("per_step") else "?"
        tag = f"**{name}**" + (" (baseline)" if name == base and name != "baseline" else "") if name == base else name
        lines.append(f"| {tag} | {len(v['seeds_done'])} | {gf} | "
                     + " | ".join(_pm(m.get(k)) for k in ("v2a_R@1", "a2v_R@1", "v2a_R@5", "a2v_R@5",
                                                          "v2a_R@10", "a2v_R@10", "probe")) + " |")
    n = st.get("num_val")
    if n:
        lines.append(f"| chance ({n} candidates) | | | {100 / n:.2f} | {100 / n:.2f} | {min(500 / n, 100):.2f} | "
                     f"{min(500 / n, 100):.2f} | {min(1000 / n, 100):.2f} | {min(1000 / n, 100):.2f} | |")
    probe_note = next((r.get("probe") for v in vs.values() for r in v["runs"].values() if r.get("probe")), None)
    if probe_note:
        lines += ["", f"probe: attention probe on the frozen encoders, {probe_note['metric']} in percent "
                  f"({probe_note['num_classes']} classes, trained on {probe_note['num_train']} clips of the training "
                  f"split, {probe_note['epochs']} epochs, final epoch on the held-out split)."]
    lines += ["", f"## Difference to `{base}` (paired over seeds, 95 % confidence interval)", "",
              "Mean of the per-seed differences [95 % CI]; * = the interval excludes 0. Half-width = how "
              f"far the true mean difference may lie from the estimate; it resolves a {RESOLVE_POINTS:g}-point "
              f"R@1 difference when it is below {RESOLVE_POINTS:g}.", "",
              "| variant | V→A R@1 | A→V R@1 | V→A R@5 | A→V R@5 | probe | R@1 half-width (V→A / A→V) | "
              f"resolves {RESOLVE_POINTS:g} pt R@1? |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, v in vs.items():
        if name == base:
            continue
        c = v["vs_baseline"]
        hws = [c.get(k, {}).get("half_width") for k in ("v2a_R@1", "a2v_R@1")]
        hw = " / ".join("–" if h is None else f"{h:.2f}" for h in hws)
        res = [c.get(k, {}).get("resolves") for k in ("v2a_R@1", "a2v_R@1")]
        resolved = ("no (needs ≥ 2 seeds)" if None in res else "yes" if all(res) else "no" if not any(res)
                    else f"V→A {'yes' if res[0] else 'no'}, A→V {'yes' if res[1] else 'no'}")
        lines.append(f"| {name} | " + " | ".join(_ci(c.get(k)) for k in CI_METRICS) + f" | {hw} | {resolved} |")
    lines += ["", "CI: " + st["ci"] + " (Student t; it covers the spread over training seeds on this held-out "
              "split, not the sampling error of the split itself).", ""]
    return "\n".join(lines)


def loss_curve(run_folder: Path, key: str) -> dict[int, float]:
    """step -> value of ``key`` from a run's metrics.jsonl (a resumed run's rows replace earlier ones)."""
    from tgdp.training.logger import read_metrics

    path = Path(run_folder) / "metrics.jsonl"
    out: dict[int, float] = {}
    if not path.is_file():
        return out
    for row in read_metrics(path):
        if row.get(key) is not None:
            out[int(row["step"])] = float(row[key])
    return dict(sorted(out.items()))


def plot_study(summary: dict, run_folders: dict[str, dict[int, Path]], path: Path) -> Path:
    """Left: R@1 and R@5 per variant (mean, std error bars; V→A and A→V). Right: training losses
    (reconstruction, contrastive; mean over seeds) of every variant overlaid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary["variants"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    keys = ["v2a_R@1", "a2v_R@1", "v2a_R@5", "a2v_R@5"]
    width = 0.8 / len(keys)
    x = np.arange(len(names))
    for i, key in enumerate(keys):
        ms = [summary["variants"][n]["metrics"].get(key) or {} for n in names]
        mean = [m.get("mean") or 0.0 for m in ms]
        err = [m.get("std") or 0.0 for m in ms]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, mean, width, yerr=err, capsize=3, label=METRICS[key][0])
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_ylabel("recall (%)")
    ax.set_title("held-out retrieval (mean ± std over seeds)")
    ax.legend(fontsize=8)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, title in ((axes[1], "loss_rec", "reconstruction loss"), (axes[2], "loss_con", "contrastive loss")):
        for j, name in enumerate(names):
            curves = [loss_curve(p, key) for p in run_folders.get(name, {}).values()]
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            vals = np.array([[c[s] for s in steps] for c in curves])
            col = colours[j % len(colours)]
            ax.plot(steps, vals.mean(0), color=col, label=name, lw=1.3)
            if len(curves) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=col, alpha=0.15)
        ax.set_xlabel("step")
        ax.set_title(f"training {title} (mean; band = min–max over seeds)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_outputs(out: Path, summary: dict, run_folders: dict[str, dict[int, Path]]) -> dict[str, str]:
    out = Path(out)
    atomic_write_json(out / "ablation.json", summary)
    atomic_write_text(out / "ablation.md", format_markdown(summary))
    png = plot_study(summary, run_folders, out / "ablation.png")
    return {"json": str(out / "ablation.json"), "md": str(out / "ablation.md"), "plot": str(png)}
