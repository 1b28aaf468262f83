#!/usr/bin/env python3
"""summarize.py RAW_CSV META_TSV MEM_CSV OUT_MD OUT_CSV

Turns bench/run.sh's raw measurements into the results table.

RAW_CSV  lines `phase,system,rep,seconds` (seconds may be FAIL or SKIP)
META_TSV lines `key<TAB>value` (shown in the header, in order; keys used below)
MEM_CSV  lines `system,baseline_kib,hwm_kib,max_rss_kib,copy_seconds,note`
Writes markdown to OUT_MD and a summary CSV to OUT_CSV; prints the markdown.
"""

import csv
import statistics
import sys

SYSTEMS = ["local", "sshfs", "ferry"]
WARM = {"seqread_warm", "ls_warm"}


def phases(meta):
    big = int(meta.get("_big_mib", "0"))
    nfiles = meta.get("_tree_files", "?")
    ndir = meta.get("_dir_entries", "?")
    nrand = meta.get("_rand_reads", "?")
    tar_mib = meta.get("_tree_mib", "?")
    return [
        ("seqread_cold", f"sequential read {big} MiB, cold (dd bs=1M)", big),
        ("seqread_remount", f"sequential read {big} MiB after remount + drop_caches (client disk cache kept)", big),
        ("seqread_warm", f"sequential read {big} MiB, warm (dd bs=1M)", big),
        ("seqwrite", f"sequential write {big} MiB (dd bs=1M conv=fsync)", big),
        ("cp_inside", f"cp of the {big} MiB file to a new file in the same mount + sync", big),
        ("randread_cold", f"{nrand} random 4 KiB preads of the {big} MiB file, cold", None),
        ("ls_cold", f"ls -l of a {ndir}-entry directory, cold", None),
        ("ls_cold_fresh", f"ls -l of a {ndir}-entry directory, cold, ferryd restarted first", None),
        ("ls_warm", f"ls -l of a {ndir}-entry directory, warm", None),
        ("untar", f"untar {nfiles} files ({tar_mib} MiB) + sync", None),
        ("lsR_cold", f"ls -lR of the untarred tree, cold", None),
        ("readall_cold", f"cat every file of the tree, cold", None),
        ("rmrf", f"rm -rf of the tree", None),
    ]


def fmt(x, nd=3):
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.1f}"
    if x >= 10:
        return f"{x:.2f}"
    return f"{x:.{nd}f}"


def ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def main():
    raw_path, meta_path, mem_path, out_md, out_csv = sys.argv[1:6]
    meta = {}
    meta_order = []
    with open(meta_path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or "\t" not in line:
                continue
            k, v = line.split("\t", 1)
            if k not in meta:
                meta_order.append(k)
            meta[k] = v

    samples = {}  # (phase, system) -> [seconds]
    fails = {}
    with open(raw_path) as f:
        for row in csv.reader(f):
            if len(row) < 4:
                continue
            phase, system, _rep, sec = row[:4]
            if sec in ("FAIL", "TIMEOUT"):
                fails[(phase, system)] = fails.get((phase, system), 0) + 1
                continue
            if sec == "SKIP":
                continue
            samples.setdefault((phase, system), []).append(float(sec))

    def med(phase, system):
        s = samples.get((phase, system))
        return statistics.median(s) if s else None

    lines = []
    title = meta.get("title", "ferry benchmark")
    lines.append(f"# {title}")
    lines.append("")
    for k in meta_order:
        if k == "title" or k.startswith("_"):
            continue
        lines.append(f"- **{k}**: {meta[k]}")
    lines.append("")
    lines.append("Seconds per phase (median of the runs; lower is better). "
                 "`sshfs/ferry` > 1 means ferry is faster; `local/ferry` (warm phases only) "
                 "is the fraction of local-disk speed ferry reaches.")
    lines.append("")
    header = ["phase", "what", "local s", "sshfs s", "ferry s", "sshfs/ferry", "local/ferry (warm)", "MB/s local / sshfs / ferry", "runs l/s/f"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    csv_rows = [["phase", "description", "local_s", "sshfs_s", "ferry_s", "sshfs_over_ferry",
                 "local_over_ferry_warm", "local_MBps", "sshfs_MBps", "ferry_MBps",
                 "runs_local", "runs_sshfs", "runs_ferry", "failures"]]
    for phase, desc, mib in phases(meta):
        m = {s: med(phase, s) for s in SYSTEMS}
        if all(v is None for v in m.values()) and not any(fails.get((phase, s)) for s in SYSTEMS):
            continue
        r_sf = ratio(m["sshfs"], m["ferry"])
        r_lf = ratio(m["local"], m["ferry"]) if phase in WARM else None
        mbps = {s: (mib * 1048576 / 1e6 / m[s]) if (mib and m[s]) else None for s in SYSTEMS}
        runs = []
        for s in SYSTEMS:
            n = len(samples.get((phase, s), []))
            nf = fails.get((phase, s), 0)
            runs.append(f"{n}" + (f"+{nf}F" if nf else ""))
        cells = []
        for s in SYSTEMS:
            if m[s] is None and fails.get((phase, s)):
                cells.append("FAIL")
            else:
                cells.append(fmt(m[s]))
        mb = " / ".join("–" if mbps[s] is None else f"{mbps[s]:.0f}" for s in SYSTEMS) if mib else ""
        lines.append("| " + " | ".join([
            phase, desc, *cells,
            "–" if r_sf is None else f"{r_sf:.3g}",
            "–" if r_lf is None else f"{r_lf:.3g}",
            mb, " / ".join(runs)]) + " |")
        csv_rows.append([phase, desc] + ["" if m[s] is None else f"{m[s]:.4f}" for s in SYSTEMS]
                        + ["" if r_sf is None else f"{r_sf:.3f}", "" if r_lf is None else f"{r_lf:.3f}"]
                        + ["" if mbps[s] is None else f"{mbps[s]:.1f}" for s in SYSTEMS]
                        + [str(len(samples.get((phase, s), []))) for s in SYSTEMS]
                        + [str(sum(fails.get((phase, s), 0) for s in SYSTEMS))])

    mem_rows = []
    try:
        with open(mem_path) as f:
            mem_rows = [r for r in csv.reader(f) if len(r) >= 5]
    except FileNotFoundError:
        pass
    if mem_rows:
        lines.append("")
        lines.append("Client memory while copying the big file inside the mount "
                     "(`dd if=MP/big.bin of=MP/copy.bin bs=1M`: every byte read and written "
                     "through the mount daemon, unlike `cp`, which ferry has the server do; "
                     "fresh mount; VmHWM/VmRSS of the mount daemon and its children, summed):")
        lines.append("")
        lines.append("| client | RSS after mount MiB | peak RSS (VmHWM) MiB | max sampled VmRSS MiB | copy s | note |")
        lines.append("|---|---|---|---|---|---|")
        for r in mem_rows:
            system, base, hwm, mx, cs = r[:5]
            note = r[5] if len(r) > 5 else ""

            def mib(v):
                try:
                    return f"{int(v) / 1024:.1f}"
                except ValueError:
                    return v or "–"
            lines.append(f"| {system} | {mib(base)} | {mib(hwm)} | {mib(mx)} | {cs or '–'} | {note} |")
    md = "\n".join(lines) + "\n"
    with open(out_md, "w") as f:
        f.write(md)
    with open(out_csv, "w", newline="") as f:
        csv.writer(f).writerows(csv_rows)
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
