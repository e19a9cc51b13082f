"""The markdown table, the targets and the PNG chart from a run's results."""

from __future__ import annotations

import math

# (label, key, format); keys missing for a proxy show as "–".
ROWS = [
    ("Throughput, 1 session (MB/s)", "tp1_MBps", "{:.0f}"),
    ("  proxy CPU per GB relayed (s)", "tp1_proxy_cpu_s_per_GB", "{:.2f}"),
    ("  cores busy: proxy", "tp1_cpu_proxy", "{:.2f}"),
    ("  cores busy: server", "tp1_cpu_server", "{:.2f}"),
    ("  cores busy: client", "tp1_cpu_client", "{:.2f}"),
    ("  bytes counted ÷ bytes the server sent", "tp1_counted_per_sent", "{:.3f}"),
    ("  recorded (MB) / recordings failed (cpvm-rec)", ("rec_MB", "rec_failed"), "{:.0f}"),
    ("Throughput, {multi} sessions (MB/s)", "tpN_MBps", "{:.0f}"),
    ("  proxy CPU per GB relayed (s)", "tpN_proxy_cpu_s_per_GB", "{:.2f}"),
    (
        "  cores busy: proxy / server / client",
        ("tpN_cpu_proxy", "tpN_cpu_server", "tpN_cpu_client"),
        "{:.2f}",
    ),
    ("  proxy processes", "tpN_proxy_processes", "{:.0f}"),
    ("  cores busy, each proxy process", "tpN_proxy_cores_each", "{:.2f}"),
    ("  descriptors, each proxy process", "tpN_proxy_fds_each", "{:.0f}"),
    ("  machine ceiling: all cores at this CPU/GB (MB/s)", "tpN_cpu_ceiling_MBps", "{:.0f}"),
    ("  bytes counted ÷ bytes the server sent", "tpN_counted_per_sent", "{:.3f}"),
    ("Round trip p50 (µs)", "rtt_p50_us", "{:.0f}"),
    ("Round trip p90 (µs)", "rtt_p90_us", "{:.0f}"),
    ("Round trip p99 (µs)", "rtt_p99_us", "{:.0f}"),
    ("  after idle, p50 / p99 (µs)", ("rtt_cold_p50_us", "rtt_cold_p99_us"), "{:.0f}"),
    ("Setup, sequential (sessions/s)", "setup_seq_per_s", "{:.0f}"),
    ("  setup p50 / p99 (ms)", ("setup_seq_p50_ms", "setup_seq_p99_ms"), "{:.2f}"),
    ("  proxy CPU per setup (ms)", "setup_seq_proxy_cpu_ms", "{:.2f}"),
    ("  token minting (tokens/s, 4 threads)", "mint_per_s", "{:.0f}"),
    ("  mint + setup, serial (sessions/s)", "setup_seq_incl_mint_per_s", "{:.0f}"),
    ("Setup, concurrent (sessions/s)", "setup_conc_per_s", "{:.0f}"),
    (
        "  cores busy: proxy / server / client",
        ("setup_conc_cpu_proxy", "setup_conc_cpu_server", "setup_conc_cpu_client"),
        "{:.2f}",
    ),
    ("Slow reader: proxy RSS growth (MiB)", "slow_growth_MiB", "{:.1f}"),
    ("  KeyEvent delivered (delay ms)", "slow_key_delay_ms", "{:.0f}"),
]
IDLE_ROWS = [
    ("Idle {n}: opened / alive", ("idle{n}_opened", "idle{n}_alive"), "{:.0f}"),
    ("  memory per session PSS (KB)", "idle{n}_pss_KB", "{:.1f}"),
    ("  memory per session RSS / USS (KB)", ("idle{n}_rss_KB", "idle{n}_uss_KB"), "{:.1f}"),
    ("  proxy processes / total PSS (MB)", ("idle{n}_processes", "idle{n}_total_pss_MB"), "{:.0f}"),
    ("  descriptors, each proxy process", "idle{n}_fds_each", "{:.0f}"),
]
RATIO_KEYS = {
    "tp1_MBps",
    "tpN_MBps",
    "rtt_p50_us",
    "rtt_p90_us",
    "rtt_p99_us",
    "setup_seq_per_s",
    "setup_conc_per_s",
    "tp1_proxy_cpu_s_per_GB",
    "tpN_proxy_cpu_s_per_GB",
    "idle{n}_pss_KB",
    "setup_seq_proxy_cpu_ms",
}


def _fmt(r: dict, key, fmt: str) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    out = []
    for k in keys:
        v = r.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append("–")
        elif isinstance(v, list):
            out.append(
                " + ".join(fmt.format(x) for x in v)
                if len(v) <= 4
                else f"{len(v)} processes, max {fmt.format(max(v))}"
            )
        else:
            out.append(fmt.format(v))
    return " / ".join(out)


def _ratio(a, b) -> str:
    if a is None or b is None or not b or isinstance(a, bool):
        return "–"
    if any(isinstance(x, float) and math.isnan(x) for x in (a, b)):
        return "–"
    return f"{a / b:.2f}×"


def idle_sizes(results: dict) -> list[int]:
    sizes = set()
    for r in results.values():
        for k in r:
            if k.startswith("idle") and k.endswith("_opened"):
                sizes.add(int(k[4:-7]))
    return sorted(sizes)


def table(run: dict, multi: int) -> str:
    results = run["results"]
    names = list(results)
    c = "cpvm" if "cpvm" in results else None
    head = names + ["cpvm ÷ websockify", "cpvm ÷ socat"]
    lines = ["| figure | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    rows = [(label.format(multi=multi), key, fmt) for label, key, fmt in ROWS]
    for n in idle_sizes(results):
        rows += [
            (
                label.format(n=n),
                tuple(k.format(n=n) for k in key) if isinstance(key, tuple) else key.format(n=n),
                fmt,
            )
            for label, key, fmt in IDLE_ROWS
        ]
    ratio_keys = {k.format(n=n) for k in RATIO_KEYS for n in idle_sizes(results) or [0]}
    for label, key, fmt in rows:
        if not any(_fmt(results[nm], key, fmt).strip("–/ ") for nm in names):
            continue
        cells = [_fmt(results[nm], key, fmt) for nm in names]
        if key == "slow_key_delay_ms":
            cells = [
                (
                    "yes (" + cell + ")"
                    if results[nm].get("slow_key_delivered")
                    else ("no" if "slow_key_delivered" in results[nm] else "–")
                )
                for nm, cell in zip(names, cells, strict=True)
            ]
        if key == "slow_growth_MiB":
            cells = [
                cell + (" (aborted at 1 GiB)" if results[nm].get("slow_aborted") else "")
                for nm, cell in zip(names, cells, strict=True)
            ]
        ratios = ["–", "–"]
        if c and isinstance(key, str) and key in ratio_keys:
            ratios = [
                _ratio(results[c].get(key), results.get(other, {}).get(key))
                for other in ("websockify", "socat")
            ]
        lines.append(f"| {label} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def targets(run: dict) -> list[tuple[str, str, str]]:
    """(target, verdict, evidence) for each target in the issue."""
    res = run["results"]
    c, w, s = res.get("cpvm", {}), res.get("websockify", {}), res.get("socat", {})
    w2 = res.get("cpvm-w2", {})
    out = []

    def verdict(ok):
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    def both(*vals):
        return all(v is not None for v in vals)

    a, b, d = c.get("tp1_MBps"), w.get("tp1_MBps"), s.get("tp1_MBps")
    ok = (a >= 1.3 * b and a >= d) if both(a, b, d) else None
    out.append(
        (
            "1-session throughput ≥ 1.3× websockify and ≥ 1.0× socat",
            verdict(ok),
            f"{_ratio(a, b)} websockify, {_ratio(a, d)} socat" if both(a, b, d) else "",
        )
    )
    a, b = c.get("rtt_p99_us"), s.get("rtt_p99_us")
    out.append(
        (
            "round-trip p99 ≤ socat's",
            verdict(a <= b if both(a, b) else None),
            f"{a:.0f} µs vs {b:.0f} µs" if both(a, b) else "",
        )
    )
    a, b = c.get("setup_seq_per_s"), w.get("setup_seq_per_s")
    out.append(
        (
            "sequential setup ≥ 5× websockify (incl. redemption)",
            verdict(a >= 5 * b if both(a, b) else None),
            f"{a:.0f}/s vs {b:.0f}/s = {_ratio(a, b)}" if both(a, b) else "",
        )
    )
    sizes = [n for n in idle_sizes(res) if f"idle{n}_pss_KB" in c]
    if sizes:
        worst = max(c[f"idle{n}_pss_KB"] for n in sizes)
        out.append(
            (
                "idle memory ≤ 60 KB per session",
                verdict(worst <= 60),
                ", ".join(f"{n}: {c[f'idle{n}_pss_KB']:.1f} KB" for n in sizes),
            )
        )
    big = c.get("idle10000_alive")
    fds = c.get("idle10000_fds_each") or [None]
    out.append(
        (
            "one process up to its descriptor ceiling (not a target: just under 10,000)",
            "n/a" if big is None else "shown",
            ""
            if big is None
            else f"{big} held by one cpvm process with {fds[0]} "
            "descriptors open (hard limit 20,000 = 2 per session + listener, epoll, "
            "log, manager connections)",
        )
    )
    if "idle10000_alive" in w2:
        fds = w2.get("idle10000_fds_each") or []
        out.append(
            (
                "10,000 concurrent sessions with workers = 2",
                verdict(w2["idle10000_alive"] >= 10000),
                f"{w2['idle10000_alive']} held in {w2.get('idle10000_processes')} "
                f"process(es), descriptors {' + '.join(str(f) for f in fds)}; "
                f"{w2.get('idle10000_pss_KB', float('nan')):.1f} KB PSS per session",
            )
        )
    g, k = c.get("slow_growth_MiB"), c.get("slow_key_delivered")
    out.append(
        (
            "slow reader: proxy memory ≤ 2 MiB growth and input delivered",
            verdict(g <= 2 and k if both(g, k) else None),
            f"{g:.1f} MiB, key {'delivered' if k else 'lost'}" if both(g, k) else "",
        )
    )
    out.append(_recording_target(c, res.get("cpvm-rec", {}), verdict))
    a, b = w2.get("tpN_MBps"), c.get("tpN_MBps")
    procs = w2.get("tpN_proxy_processes")
    ceiling = c.get("tpN_cpu_ceiling_MBps")
    each = w2.get("tpN_proxy_cores_each") or []
    out.append(
        (
            "workers = 2: aggregate throughput ≥ 1.6× one worker",
            verdict(a >= 1.6 * b if both(a, b) else None),
            f"{_ratio(a, b)} ({procs} cpvm processes, cores busy "
            f"{' + '.join(f'{x:.2f}' for x in each)}); this machine's CPU ceiling for "
            f"the workload is {_ratio(ceiling, b)} one worker"
            if both(a, b, ceiling)
            else "",
        )
    )
    return out


def _recording_target(c: dict, rec: dict, verdict) -> tuple[str, str, str]:
    """Recording every session: proxy CPU per MB ≤ 1.2× cpvm's in the same run."""
    a, b = rec.get("tp1_proxy_cpu_s_per_GB"), c.get("tp1_proxy_cpu_s_per_GB")
    if a is None or b is None:
        return ("recording: ≤ 20 % more proxy CPU per MB (1 session)", "n/a", "")
    complete = rec.get("rec_failed", 0) == 0
    evidence = (
        f"{_ratio(a, b)} cpvm's CPU per GB ({a:.2f} s vs {b:.2f} s); "
        f"{rec.get('tp1_MBps', float('nan')):.0f} vs {c.get('tp1_MBps', float('nan')):.0f} MB/s; "
        f"{rec.get('rec_MB', 0):.0f} MB in {rec.get('rec_files', 0)} files, "
        + ("every recording complete" if complete else f"{rec['rec_failed']} recording(s) failed")
    )
    return (
        "recording: ≤ 20 % more proxy CPU per MB (1 session)",
        verdict(a <= 1.2 * b and complete),
        evidence,
    )


def targets_markdown(run: dict) -> str:
    lines = ["| target | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {e} |" for t, v, e in targets(run)]
    return "\n".join(lines)


def chart(run: dict, path, multi: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = run["results"]
    names = list(res)
    sizes = [n for n in idle_sizes(res)]
    panels = [
        ("1-session throughput (MB/s) ↑", "tp1_MBps"),
        (f"{multi}-session throughput (MB/s) ↑", "tpN_MBps"),
        ("proxy CPU s per GB (1 session) ↓", "tp1_proxy_cpu_s_per_GB"),
        ("round trip p99 (µs) ↓", "rtt_p99_us"),
        ("sequential setup (sessions/s) ↑", "setup_seq_per_s"),
        ("concurrent setup (sessions/s) ↑", "setup_conc_per_s"),
    ]
    if sizes:
        panels.append(
            (f"idle memory per session, PSS KB, {sizes[0]} sessions ↓", f"idle{sizes[0]}_pss_KB")
        )
    panels.append(("slow reader RSS growth (MiB) ↓", "slow_growth_MiB"))
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows))
    colours = {
        "direct": "#999999",
        "socat": "#4c72b0",
        "websockify": "#dd8452",
        "cpvm": "#55a868",
        "cpvm-w2": "#8fd19e",
        "cpvm-rec": "#f4a261",
    }
    for ax, (title, key) in zip(axes.flat, panels, strict=False):
        xs = [n for n in names if isinstance(res[n].get(key), (int, float))]
        ys = [res[n][key] for n in xs]
        ax.bar(xs, ys, color=[colours.get(n, "#c44e52") for n in xs])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
        for i, y in enumerate(ys):
            ax.annotate(f"{y:.3g}", (i, y), ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"cpvm bench ({run['profile']}); direct and socat are TCP-level, "
        "websockify and cpvm WebSocket",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
