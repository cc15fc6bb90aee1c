"""PNG plots of an e2e payload (bench/e2e.py's JSON): they can be redrawn from the JSON alone.

- <stem>_throughput.png: total and output tokens/s per system, with the ratio to HF static.
- <stem>_latency_cdf.png: CDFs of TTFT, TPOT, inter-token latency and end-to-end latency.
- <stem>_timeline.png: tokens per engine step split into prefill and decode, per policy (the
  picture of what each scheduler does: static drains, prefill_first pauses decodes,
  continuous mixes both under one budget).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on the benchmark machines
    import matplotlib.pyplot as plt
    return plt


def _ok(payload):
    return {k: v for k, v in payload["systems"].items() if v.get("status") == "ok"}


def _title(payload):
    c, w = payload["config"], payload["workload"]
    return (f"{c['workload']} {c['workload_kwargs']} — {c['model']} {c['dtype']}, "
            f"{w['num_requests']} req, {payload['run_info']['device']}")


def throughput(payload, path):
    plt = _plt()
    systems = _ok(payload)
    names = list(systems)
    total = [systems[n]["summary"]["total_tokens_per_s"] for n in names]
    output = [systems[n]["summary"]["output_tokens_per_s"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4.5))
    ax.bar(x - 0.2, total, 0.4, label="total (prompt + output) tok/s")
    ax.bar(x + 0.2, output, 0.4, label="output tok/s")
    for i, n in enumerate(names):
        r = systems[n].get("ratio_to_hf_static", {}).get("total_tokens_per_s")
        if r:
            ax.annotate(f"{r:.2f}x", (x[i] - 0.2, total[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylabel("tokens / s")
    ax.set_title(_title(payload), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency_cdf(payload, path):
    plt = _plt()
    systems = _ok(payload)
    panels = (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("inter-token latency", None),
              ("end-to-end latency", "e2e_s"))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, (label, key) in zip(axes, panels):
        for name, s in systems.items():
            if key is None:  # stored as quantiles at evenly spaced probabilities
                v = np.asarray(s.get("itl_cdf_s", [])) * 1e3
                y = np.linspace(0, 1, v.size)
            else:
                v = np.sort([r[key] * 1e3 for r in s["requests"] if r[key] is not None])
                y = np.arange(1, v.size + 1) / max(v.size, 1)
            if v.size:
                ax.plot(np.maximum(v, 1e-3), y, label=name, drawstyle="steps-post")
        ax.set_xlabel(f"{label} (ms)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # log minor labels overlap
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests (ITL: of token gaps)")
    axes[0].legend(fontsize=7)
    fig.suptitle(_title(payload), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timeline(payload, path):
    plt = _plt()
    runs = {k: v for k, v in _ok(payload).items() if v.get("step_log")}
    if not runs:
        return False
    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 2.6 * len(runs)), squeeze=False,
                             sharey=True)
    for ax, (name, s) in zip(axes[:, 0], runs.items()):
        log = s["step_log"]
        # x = wall time at the end of each step, so a long prefill step shows as a long gap.
        t = np.cumsum([r["step_time_s"] for r in log])
        pre = np.asarray([r["num_prefill_tokens"] for r in log])
        dec = np.asarray([r["num_decode_tokens"] for r in log])
        ax.fill_between(t, 0, dec, step="pre", label="decode tokens", alpha=0.8)
        ax.fill_between(t, dec, dec + pre, step="pre", label="prefill tokens", alpha=0.8)
        ax.set_title(f"{name}: {len(log)} steps, {s['steps'].get('preemptions', 0)} preemptions",
                     fontsize=9)
        ax.set_ylabel("tokens / step")
    axes[-1, 0].set_xlabel("engine time (s, summed step times)")
    axes[0, 0].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(payload, out_dir, stem) -> list[Path]:
    out_dir = Path(out_dir)
    files = []
    for suffix, fn in (("throughput", throughput), ("latency_cdf", latency_cdf),
                       ("timeline", timeline)):
        path = out_dir / f"{stem}_{suffix}.png"
        if fn(payload, path) is not False:
            files.append(path)
    return files
