"""PNG plots of an e2e payload (bench/e2e.py's JSON): they can be redrawn from the JSON alone.

- <stem>_throughput.png: total and output tokens/s per system (median of the repeats, bars
  min-max), with the ratio to HF static (median of the repeat-paired ratios).
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


def _workload_text(c) -> str:
    """'anyscale: prompt 32, output ~Exp(32) capped at 128' rather than the kwargs dict."""
    k = c["workload_kwargs"]
    out = f"output ~Exp(mean {k['mean_output']:g}) capped at {k['cap']}" if "cap" in k else ""
    parts = {"anyscale": [f"prompt {k.get('prompt_len')}", out],
             "poisson": [f"Poisson {k.get('rate')} req/s", f"prompt {k.get('prompt_range')}", out],
             "shared_prefix": [f"shared prefix {k.get('prefix_len')}",
                               f"suffix {k.get('suffix_range')}", out],
             "stall": [f"long prompts {k.get('long_range')} every {k.get('interval')} s",
                       f"{k.get('decode_tokens')}-token decodes"]}.get(c["workload"], [str(k)])
    return f"{c['workload']}: " + ", ".join(p for p in parts if p)


def _title(payload) -> str:
    c, w = payload["config"], payload["workload"]
    reps = c.get("repeats", 1)
    load = payload.get("load") or {}
    worst = load.get("max_1min")
    return (f"{_workload_text(c)}; {w['num_requests']} requests\n{c['model']} {c['dtype']} on "
            f"{payload['run_info']['device']}"
            + (f", median of {reps} interleaved repeats (bars: min-max)" if reps > 1 else "")
            + (f", load avg up to {worst:.1f}" if worst is not None else ""))


def _spread(s, key):
    sp = (s.get("spread") or {}).get(key)
    if sp:
        return sp["median"], sp["min"], sp["max"]
    v = s["summary"][key]
    return v, v, v


def throughput(payload, path):
    plt = _plt()
    systems = _ok(payload)
    names = list(systems)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.7 * len(names)), 4.8))
    for off, key, label in ((-0.2, "total_tokens_per_s", "total (prompt + output) tok/s"),
                            (0.2, "output_tokens_per_s", "output tok/s")):
        med, lo, hi = np.array([_spread(systems[n], key) for n in names]).T.reshape(3, -1)
        ax.bar(x + off, med, 0.4, label=label, yerr=[med - lo, hi - med], capsize=3)
        if key == "total_tokens_per_s":
            tops = hi
    for i, n in enumerate(names):
        r = systems[n].get("ratio_to_hf_static", {}).get("total_tokens_per_s")
        if r and n != "hf_static":
            paired = len(systems[n].get("repeats", ())) > 1   # median of per-repeat ratios
            ax.annotate(f"{r:.2f}x vs\nHF static" + ("\n(paired)" if paired else ""),
                        (x[i] - 0.2, tops[i]), xytext=(0, 4),
                        textcoords="offset points", ha="center",
                        va="bottom", fontsize=7)
    labels = [n + (f"\n(batch {systems[n]['batch_size']})" if "batch_size" in systems[n] else "")
              for n in names]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the ratio labels
    ax.set_title(_title(payload), fontsize=8)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Curves that coincide (e.g. two policies with the same latencies) stay visible: each system
# has its own dash pattern and marker, drawn thinner the later it comes.
STYLES = [dict(ls="-", marker="o"), dict(ls="--", marker="s"), dict(ls=":", marker="^"),
          dict(ls="-.", marker="D"), dict(ls=(0, (5, 1, 1, 1)), marker="v"),
          dict(ls=(0, (1, 3)), marker="x")]


def latency_cdf(payload, path):
    plt = _plt()
    systems = _ok(payload)
    panels = (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("inter-token latency", None),
              ("end-to-end latency", "e2e_s"))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6))
    for ax, (label, key) in zip(axes, panels):
        for i, (name, s) in enumerate(systems.items()):
            if key is None:  # stored as quantiles at evenly spaced probabilities
                v = np.asarray(s.get("itl_cdf_s", [])) * 1e3
                y = np.linspace(0, 1, v.size)
            else:
                v = np.sort([r[key] * 1e3 for r in s["requests"] if r[key] is not None])
                y = np.arange(1, v.size + 1) / max(v.size, 1)
            if v.size:
                st = STYLES[i % len(STYLES)]
                ax.plot(np.maximum(v, 1e-3), y, label=name, drawstyle="steps-post",
                        ls=st["ls"], marker=st["marker"], markevery=max(1, v.size // 8),
                        markersize=4, lw=2.2 - 0.3 * (i % 5), alpha=0.85)
        ax.set_xlabel(f"{label} (ms)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # log minor labels overlap
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("fraction of requests (ITL: of token gaps)")
    fig.suptitle(_title(payload) + " — the median repeat's distributions", fontsize=8)
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
