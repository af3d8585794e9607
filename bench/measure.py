#!/usr/bin/env python3
"""Benchmark helper for bench/run.sh (python3 standard library only).

Subcommands:

  measure.py run [--stdout FILE] [--stderr FILE] -- CMD [ARGS...]
      Run one command and print one JSON object: wall time (s), peak RSS of
      the child (KiB, from wait4's ru_maxrss), user/sys CPU time, exit code.

  measure.py case --results FILE --id ID --title TITLE --kind KIND
                  --template TEMPLATE [--tool NAME=PATH ...] [--input PATH ...]
                  [--out-ext EXT] [--out-fmt FMT] [--workdir DIR]
                  [--runs N] [--drop-caches 0|1]
      Run one benchmark case for every tool: one untimed verification run per
      tool, then N timed runs per tool with the tool order alternating from
      run to run.  Appends one JSON object to the results file (JSON lines).

      TEMPLATE is a shell-like command line; {tool} is replaced by the tool
      path, {out} by a per-tool output path in the work directory.
      --setup TEMPLATE runs (untimed, as a shell command, {out} replaced) before
      every run of every tool: for commands that change their inputs in place
      (commit, rebase), it lays out a fresh copy at {out}.  --expect FILE makes
      an image case compare every tool's output with FILE instead of with
      qemu-img's output, and `qemu-img check` every tool's output.
      --expect-backing PATH|none (with --expect) also requires every tool's
      output to name PATH (same file after resolving) as its backing file, in
      the output format, or to have no backing file at all ("none").
      KIND says how the outputs are verified against qemu-img's:
        image   -- `qemu-img compare -f FMT -F FMT` of the two output images
                   (and `qemu-img check` of the vdisk output when FMT=qcow2)
        stdout  -- byte-identical standard output and identical exit code
        none    -- not verified (reference commands such as cp)

  measure.py meta --out FILE --repo DIR --vdisk PATH --qemu-img PATH ...
      Record date, machine, tool versions and input descriptions.

  measure.py report --results FILE --meta FILE --md FILE --json FILE
      Write BENCHMARKS.md and results.json from the collected results.
"""

import argparse
import hashlib
import filecmp
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")


# --------------------------------------------------------------------------
# one measured run


# Peak RSS and the fork problem: a child's ru_maxrss also counts the memory
# of the process it was forked from, up to its exec (Linux records the old
# address space's high-water mark at exec).  A command started directly from
# this Python process therefore never reports less than Python's own RSS
# (10-20 MiB, more after reading large outputs).  When GNU time is available
# the command is started through it: GNU time is a small C program that forks
# the command and reports the command's own wait4() ru_maxrss (%M, KiB), so the
# floor is about 1 MiB.  Without GNU time, wait4()'s ru_maxrss of the direct
# child is used and the floor is reported as `rss_floor_kib` in the metadata.


def _find_gnu_time():
    for cand in ("/usr/bin/time", "/bin/time"):
        try:
            out = subprocess.run([cand, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True).stdout
        except OSError:
            continue
        if "GNU" in out:
            return cand
    return None


GNU_TIME = None if os.environ.get("BENCH_RSS_RELAY", "1") == "0" else _find_gnu_time()
RSS_METHOD = ("GNU time %M (wait4 ru_maxrss of the command, started from GNU time)" if GNU_TIME
              else "wait4 ru_maxrss of the direct child (includes the harness's own RSS as a floor)")


def measure(cmd, stdout_path=None, stderr_path=None):
    """Run cmd; return dict(wall_s, maxrss_kib, utime_s, stime_s, rc)."""
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    err = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
    relay_file = None
    argv = list(cmd)
    if GNU_TIME:
        fd, relay_file = tempfile.mkstemp(prefix="bench-rss-")
        os.close(fd)
        argv = [GNU_TIME, "-f", "%M", "-o", relay_file, "--"] + argv
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        maxrss = ru.ru_maxrss  # Linux: KiB
        if relay_file:
            with open(relay_file) as f:
                lines = f.read().splitlines()
            # "Command exited with non-zero status N" / "Command terminated by signal N" may precede %M
            maxrss = int(lines[-1].strip())
            for line in lines[:-1]:
                if line.startswith("Command terminated by signal"):
                    rc = -int(line.split()[-1])
    finally:
        if stdout_path:
            out.close()
        if stderr_path:
            err.close()
        if relay_file:
            os.unlink(relay_file)
    return {
        "wall_s": wall,
        "maxrss_kib": maxrss,
        "utime_s": ru.ru_utime,  # wait4 of the direct child includes its reaped children
        "stime_s": ru.ru_stime,
        "rc": rc,
    }


def cmd_run(args):
    cmd = args.cmd
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        sys.exit("measure.py run: no command")
    print(json.dumps(measure(cmd, args.stdout, args.stderr)))


# --------------------------------------------------------------------------
# one case


def drop_caches():
    """sync + drop the page cache; True when it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def rm_f(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_text(path, limit=4000):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    if len(text) > limit:
        text = text[:limit] + "\n[... truncated]"
    return text


def file_sizes(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"apparent_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512}


def backing_matches(path, fmt, expect):
    """(ok, description): does image `path` have backing file `expect` (or none, for "none")?"""
    c = subprocess.run([QEMU_IMG, "info", "--output=json", "-U", "-f", fmt, path],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if c.returncode != 0:
        return False, f"qemu-img info failed (rc {c.returncode}): {c.stdout.strip()[:200]}"
    info = json.loads(c.stdout)
    name = info.get("full-backing-filename") or info.get("backing-filename")
    bfmt = info.get("backing-filename-format")
    if expect == "none":
        return name is None, "none (as expected)" if name is None else f"{name} (expected none)"
    ok = name is not None and os.path.realpath(name) == os.path.realpath(expect) and bfmt == fmt
    what = f"{os.path.basename(name) if name else 'none'} ({bfmt or '-'})"
    return ok, what + ("" if ok else f", expected {os.path.basename(expect)} ({fmt})")


def render(template, tool_path, out_path):
    argv = shlex.split(template)
    return [a.replace("{tool}", tool_path).replace("{out}", out_path or "") for a in argv]


def display(template, tool_name, out_path):
    """Command line as shown in the report (tool name instead of full path)."""
    argv = render(template, tool_name, out_path)
    cwd = os.getcwd() + os.sep
    argv = [os.path.relpath(a) if a.startswith(cwd) else a for a in argv]
    return " ".join(shlex.quote(a) for a in argv)


def out_images(args, *paths):
    """qemu-img arguments naming output images `paths` (format args.out_fmt): `-f/-F FMT PATH...`,
    or, for encrypted outputs (--out-image-opts), `--object OBJ --image-opts` strings."""
    if not args.out_image_opts:
        flags = ["-f", args.out_fmt] + (["-F", args.out_fmt] if len(paths) > 1 else [])
        return flags + list(paths)
    opts = [f"driver={args.out_fmt},file.filename={p},{args.out_image_opts}" for p in paths]
    return (["--object", args.object] if args.object else []) + ["--image-opts"] + opts


def cmd_case(args):
    tools = []
    for spec in args.tool:
        name, _, path = spec.partition("=")
        tools.append((name, path))
    workdir = args.workdir
    os.makedirs(workdir, exist_ok=True)
    uses_out = "{out}" in args.template
    outs = {}
    for name, _ in tools:
        outs[name] = os.path.join(workdir, f"{args.id}.{name}{args.out_ext}") if uses_out else None
    stdout_files = {name: os.path.join(workdir, f"{args.id}.{name}.stdout") for name, _ in tools}
    stderr_files = {name: os.path.join(workdir, f"{args.id}.{name}.stderr") for name, _ in tools}

    def cleanup():
        for name, _ in tools:
            if outs[name]:
                for extra in ("", ".top", ".mid"):
                    rm_f(outs[name] + extra)
            rm_f(stdout_files[name])
            rm_f(stderr_files[name])

    def setup(name):
        """Lays out the inputs a run changes in place (untimed); fails the case if it fails."""
        if not args.setup:
            return
        cmd = args.setup.replace("{out}", shlex.quote(outs[name] or ""))
        r = subprocess.run(["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            sys.exit(f"setup for {args.id} failed ({r.returncode}): {cmd}\n{r.stdout}")

    result = {
        "id": args.id,
        "title": args.title,
        "kind": args.kind,
        "inputs": [],
        "commands": {},
        "tools": {},
        "verified": None,
        "verify_detail": "",
        "loadavg_start": loadavg(),
    }
    for p in args.input:
        s = file_sizes(p)
        result["inputs"].append({"path": p, **(s or {})})
    for name, _ in tools:
        result["commands"][name] = display(args.template, name, outs[name])

    # ---- verification run (untimed, caches warm) ----
    cleanup()
    vrun = {}
    for name, path in tools:
        setup(name)
        cmd = render(args.template, path, outs[name])
        m = measure(cmd, stdout_files[name], stderr_files[name])
        vrun[name] = {
            "rc": m["rc"],
            "stderr": read_text(stderr_files[name]),
            "output_size": file_sizes(outs[name]) if outs[name] else None,
            "stdout_bytes": os.path.getsize(stdout_files[name]) if os.path.exists(stdout_files[name]) else 0,
        }
    detail = []
    verified = None
    if args.kind != "none":
        v, q = "vdisk", "qemu-img"
        verified = True
        if vrun[v]["rc"] != vrun[q]["rc"]:
            verified = False
            detail.append(f"exit codes differ: vdisk {vrun[v]['rc']}, qemu-img {vrun[q]['rc']}")
        if vrun[v]["rc"] != 0 and args.kind == "image":
            verified = False
            detail.append(f"vdisk exited with {vrun[v]['rc']}: {vrun[v]['stderr'].strip()}")
        if args.kind == "image" and verified and args.expect:
            for name in (v, q):
                c = subprocess.run(
                    [QEMU_IMG, "compare", "-f", args.out_fmt, "-F", args.out_fmt, outs[name], args.expect],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                detail.append(f"qemu-img compare <{name} out> <expected {os.path.basename(args.expect)}>: "
                              f"rc {c.returncode}: {c.stdout.strip().rstrip('.')}")
                if c.returncode != 0:
                    verified = False
            for name in (v, q):
                c = subprocess.run([QEMU_IMG, "check", "-f", args.out_fmt, outs[name]],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                detail.append(f"qemu-img check <{name} out>: rc {c.returncode}: "
                              + " / ".join(c.stdout.strip().splitlines()).rstrip("."))
                if c.returncode not in (0, 63):
                    verified = False
            if args.expect_backing:
                for name in (v, q):
                    ok, what = backing_matches(outs[name], args.out_fmt, args.expect_backing)
                    detail.append(f"backing file of <{name} out>: {what}")
                    if not ok:
                        verified = False
        elif args.kind == "image" and verified:
            c = subprocess.run(
                [QEMU_IMG, "compare"] + out_images(args, outs[v], outs[q]),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            how = "--image-opts (with the key)" if args.out_image_opts else f"-f {args.out_fmt} -F {args.out_fmt}"
            detail.append(f"qemu-img compare {how} <vdisk out> <qemu-img out>: "
                          f"rc {c.returncode}: {c.stdout.strip().rstrip('.')}")
            if c.returncode != 0:
                verified = False
            if args.out_fmt == "qcow2":
                c = subprocess.run([QEMU_IMG, "check"] + out_images(args, outs[v]),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                detail.append(f"qemu-img check <vdisk out>: rc {c.returncode}: "
                              + " / ".join(c.stdout.strip().splitlines()).rstrip("."))
                if c.returncode != 0:
                    verified = False
        if args.kind == "stdout":
            filecmp.clear_cache()
            same = filecmp.cmp(stdout_files[v], stdout_files[q], shallow=False)
            if same:
                n = os.path.getsize(stdout_files[v])
                detail.append(f"stdout identical ({n} bytes), exit code {vrun[v]['rc']}")
            else:
                with open(stdout_files[v], "rb") as f:
                    a = f.read()
                with open(stdout_files[q], "rb") as f:
                    b = f.read()
                verified = False
                # first differing line, for the report
                al, bl = a.decode("utf-8", "replace").splitlines(), b.decode("utf-8", "replace").splitlines()
                for i in range(max(len(al), len(bl))):
                    x = al[i] if i < len(al) else "<EOF>"
                    y = bl[i] if i < len(bl) else "<EOF>"
                    if x != y:
                        detail.append(f"stdout differs ({len(a)} vs {len(b)} bytes); first at line {i + 1}: "
                                      f"vdisk {x[:200]!r} / qemu-img {y[:200]!r}")
                        break
    result["verified"] = verified
    result["verify_detail"] = "; ".join(detail)
    cleanup()

    # ---- timed runs ----
    cold_flags = []
    per_tool = {name: [] for name, _ in tools}
    for i in range(args.runs):
        order = tools if i % 2 == 0 else list(reversed(tools))
        for name, path in order:
            cleanup()
            setup(name)
            # Dirty pages of the previous run's output are written back first either way, so
            # one run's writeback does not land in the next run's time.
            cold = drop_caches() if args.drop_caches else (os.sync() or False)
            cold_flags.append(cold)
            cmd = render(args.template, path, outs[name])
            m = measure(cmd, stdout_files[name], stderr_files[name])
            m["run"] = i
            m["cold_cache"] = cold
            if m["rc"] != vrun[name]["rc"]:
                m["stderr"] = read_text(stderr_files[name])
            per_tool[name].append(m)
            print(f"  {args.id:<22} run {i + 1}/{args.runs} {name:<9} {m['wall_s']:8.3f} s "
                  f"rss {m['maxrss_kib'] / 1024:8.1f} MiB rc {m['rc']}", file=sys.stderr, flush=True)
    cleanup()

    for name, _ in tools:
        runs = per_tool[name]
        walls = [r["wall_s"] for r in runs]
        cpus = [r["utime_s"] + r["stime_s"] for r in runs]
        result["tools"][name] = {
            "runs": runs,
            "median_wall_s": statistics.median(walls) if walls else None,
            "min_wall_s": min(walls) if walls else None,
            "max_wall_s": max(walls) if walls else None,
            "median_cpu_s": statistics.median(cpus) if cpus else None,
            "peak_rss_kib": max(r["maxrss_kib"] for r in runs) if runs else None,
            "rc": vrun[name]["rc"],
            "stderr": vrun[name]["stderr"],
            "output_size": vrun[name]["output_size"],
            "stdout_bytes": vrun[name]["stdout_bytes"],
        }
    v, q = result["tools"].get("vdisk"), result["tools"].get("qemu-img")
    if v and q and v["median_wall_s"] and q["median_wall_s"]:
        result["ratio_vdisk_qemu"] = v["median_wall_s"] / q["median_wall_s"]
    else:
        result["ratio_vdisk_qemu"] = None
    result["cold_cache"] = bool(cold_flags) and all(cold_flags)
    result["runs"] = args.runs
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")



# --------------------------------------------------------------------------
# metadata about machine, tools and inputs


def sh(cmd, default="?"):
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              check=False).stdout.strip() or default
    except OSError:
        return default


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def cmd_meta(args):
    repo = args.repo
    meminfo = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            meminfo[k] = v.strip()
    cpu_model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    mem_kib = int(meminfo.get("MemTotal", "0 kB").split()[0])
    dirty = sh(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"], "")
    vst = os.stat(args.vdisk)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total": f"{mem_kib / (1 << 20):.1f} GiB",
        "kernel": os.uname().release,
        "target_fs": " ".join(sh(["findmnt", "-no", "SOURCE,FSTYPE,OPTIONS", "-T", args.bench_dir]).split()),
        "qemu_img_path": args.qemu_img,
        "qemu_img_version": sh([args.qemu_img, "--version"]).splitlines()[0],
        "vdisk_path": args.vdisk,
        "vdisk_version": sh([args.vdisk, "--version"]).splitlines()[0],
        "vdisk_commit": sh(["git", "-C", repo, "rev-parse", "HEAD"]),
        "vdisk_commit_subject": sh(["git", "-C", repo, "log", "-1", "--format=%s"])[:120],
        "vdisk_dirty": bool(dirty),
        "vdisk_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(vst.st_mtime)),
        "vdisk_sha256": hashlib.sha256(open(args.vdisk, "rb").read()).hexdigest(),
        "vdisk_snapshot": args.vdisk_snapshot,
        "runs": args.runs,
        "cold_cache": bool(args.drop_caches) and drop_caches(),
        "loadavg_start": loadavg(),
        "load_note": args.load_note or "",
        "rss_method": RSS_METHOD,
        "rss_floor_kib": measure(["/bin/true"])["maxrss_kib"],
        "inputs": [],
    }
    for spec in args.input:
        name, path, desc = spec.split("|", 2)
        meta["inputs"].append({"name": name, "path": path, "description": desc, **(file_sizes(path) or {})})
    with open(args.out, "w") as f:
        json.dump(meta, f, indent=2)

# --------------------------------------------------------------------------
# report


def fmt_s(x):
    return "—" if x is None else f"{x:.2f}"


def fmt_mib(kib):
    return "—" if kib is None else f"{kib / 1024:.1f}"


def fmt_bytes(n):
    if n is None:
        return "—"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def fmt_verified(c):
    if c["verified"] is None:
        return "n/a (reference)"
    return "yes" if c["verified"] else "**NO**"


def cmd_report(args):
    cases = []
    with open(args.results) as f:
        for line in f:
            line = line.strip()
            if line:
                cases.append(json.loads(line))
    with open(args.meta) as f:
        meta = json.load(f)
    # kept in the meta file, so that re-running `report` on the same data
    # reproduces the same document
    meta.setdefault("loadavg_end", loadavg())
    if args.total_runtime is not None:
        meta["total_runtime_s"] = args.total_runtime
    with open(args.meta, "w") as f:
        json.dump(meta, f, indent=2)

    doc = {"meta": meta, "cases": cases}
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    m = meta
    L = []
    L.append("# vdisk benchmarks")
    L.append("")
    L.append("Generated by `bench/run.sh`; do not edit by hand. Raw data: `bench/results.json`.")
    L.append("")
    L.append("## Setup")
    L.append("")
    L.append(f"- Date: {m['date']}")
    L.append(f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total']} RAM, "
             f"kernel {m['kernel']}")
    L.append(f"- File system of `target/`: {m['target_fs']}")
    L.append(f"- qemu-img: `{m['qemu_img_version']}` (`{m['qemu_img_path']}`)")
    L.append(f"- vdisk: `{m['vdisk_version']}`; HEAD `{m['vdisk_commit']}` (\"{m.get('vdisk_commit_subject', '')[:60]}…\")"
             f"{'; the work tree had uncommitted changes to tracked files when the benchmark started, so the binary may not match HEAD exactly' if m.get('vdisk_dirty') else ''}. "
             f"Binary `{os.path.relpath(m['vdisk_path'])}` (run.sh builds it with `cargo build --release` unless VDISK names another), modified {m['vdisk_mtime']}, "
             f"sha256 `{m.get('vdisk_sha256', '?')[:16]}…`"
             f"{'; the cases ran a copy taken at the start (`' + os.path.relpath(m['vdisk_snapshot']) + '`)' if m.get('vdisk_snapshot') else ''}.")
    L.append(f"- Runs per tool and case: {m['runs']}; the order of the two tools alternates from run to run; "
             "the reported time is the median wall-clock time, the reported RSS the maximum "
             "peak RSS over the timed runs.")
    L.append(f"- Peak RSS: {m.get('rss_method', '?')}; `/bin/true` measured this way: "
             f"{m.get('rss_floor_kib', 0) / 1024:.1f} MiB.")
    if m["cold_cache"]:
        L.append("- Page cache: **cold**. Before every timed run the harness ran `sync` and wrote `3` to "
                 "`/proc/sys/vm/drop_caches`, so inputs are read from the disk. The untimed "
                 "verification run is not part of the numbers.")
    else:
        L.append("- Page cache: **warm** (the default): inputs are served from the page cache after the "
                 "untimed verification run, and the harness runs `sync` before every timed run so that "
                 "writeback of a previous output does not land in the next run. This measures the tools, "
                 "not the disk: on this virtual machine cold-cache timings of the same command varied "
                 "by up to 4x between runs (`BENCH_DROP_CACHES=1` measures cold).")
    L.append(f"- Load average when the benchmark started: {m['loadavg_start']}; when it ended: "
             f"{m.get('loadavg_end', '?')}. {m.get('load_note', '')}".rstrip())
    L.append(f"- Total benchmark runtime (input generation included): {m.get('total_runtime_s', 0):.0f} s")
    L.append("")
    L.append("## Inputs")
    L.append("")
    for inp in m["inputs"]:
        L.append(f"- `{inp['name']}`: {inp['description']} "
                 f"(apparent size {fmt_bytes(inp.get('apparent_bytes'))}, "
                 f"allocated {fmt_bytes(inp.get('allocated_bytes'))})")
    L.append("")
    L.append("Inputs are cached in `target/bench/` and reused when present; outputs go to "
             "`target/bench/work/` and are deleted before every run.")
    L.append("")
    L.append("## Summary")
    L.append("")
    L.append("Ratio = vdisk median / qemu-img median (lower is better for vdisk).")
    L.append("")
    L.append("| # | case | vdisk median s | qemu-img median s | ratio | vdisk peak RSS MiB | "
             "qemu-img peak RSS MiB | verified |")
    L.append("|---|---|---:|---:|---:|---:|---:|---|")
    for n, c in enumerate(cases, 1):
        t = c["tools"]
        v, q = t.get("vdisk"), t.get("qemu-img")
        if v is None and q is None:
            # reference-only case
            name, r = next(iter(t.items()))
            L.append(f"| {n} | {c['title']} (`{name}`: {fmt_s(r['median_wall_s'])} s, "
                     f"{fmt_mib(r['peak_rss_kib'])} MiB) | — | — | — | — | — | {fmt_verified(c)} |")
            continue
        ratio = c.get("ratio_vdisk_qemu")
        L.append(f"| {n} | {c['title']} | {fmt_s(v['median_wall_s'])} | {fmt_s(q['median_wall_s'])} | "
                 f"{'—' if ratio is None else f'{ratio:.2f}'} | {fmt_mib(v['peak_rss_kib'])} | "
                 f"{fmt_mib(q['peak_rss_kib'])} | {fmt_verified(c)} |")
    L.append("")

    sized = [c for c in cases if "vdisk" in c["tools"] and c["tools"]["vdisk"].get("output_size")
             and c["tools"].get("qemu-img", {}).get("output_size")]
    if sized:
        L.append("Output files (from the verification run):")
        L.append("")
        L.append("| case | vdisk output bytes | qemu-img output bytes | vdisk/qemu-img |")
        L.append("|---|---:|---:|---:|")
        for c in sized:
            a = c["tools"]["vdisk"]["output_size"]["apparent_bytes"]
            b = c["tools"]["qemu-img"]["output_size"]["apparent_bytes"]
            L.append(f"| {c['title']} | {a} ({fmt_bytes(a)}) | {b} ({fmt_bytes(b)}) | {a / b:.3f} |")
        L.append("")

    failures = [c for c in cases if c["verified"] is False
                or any(r["rc"] != c["tools"][name]["rc"] for name in c["tools"] for r in c["tools"][name]["runs"])]
    if failures:
        L.append("## Failed or unverified cases")
        L.append("")
        for c in failures:
            L.append(f"- **{c['title']}** (`{c['id']}`): {c['verify_detail']}")
            for name, t in c["tools"].items():
                if t["rc"] != 0 and t["stderr"].strip():
                    L.append(f"  - `{c['commands'][name]}` exited with {t['rc']}: "
                             f"`{t['stderr'].strip().splitlines()[0]}`")
        L.append("")

    L.append("## Cases")
    L.append("")
    for n, c in enumerate(cases, 1):
        L.append(f"### {n}. {c['title']}")
        L.append("")
        L.append("```")
        for name, cmd in c["commands"].items():
            L.append(cmd)
        L.append("```")
        L.append("")
        has_out = any(t["output_size"] for t in c["tools"].values())
        hdr = "| tool | median s | min s | max s | CPU s (user+sys, median) | peak RSS MiB | exit code |"
        sep = "|---|---:|---:|---:|---:|---:|---:|"
        if has_out:
            hdr += " output apparent size | output allocated |"
            sep += "---:|---:|"
        L.append(hdr)
        L.append(sep)
        for name, t in c["tools"].items():
            row = (f"| {name} | {fmt_s(t['median_wall_s'])} | {fmt_s(t['min_wall_s'])} | "
                   f"{fmt_s(t['max_wall_s'])} | {fmt_s(t['median_cpu_s'])} | {fmt_mib(t['peak_rss_kib'])} | "
                   f"{t['rc']} |")
            if has_out:
                o = t["output_size"] or {}
                row += f" {fmt_bytes(o.get('apparent_bytes'))} ({o.get('apparent_bytes', '—')} B) | " \
                       f"{fmt_bytes(o.get('allocated_bytes'))} |"
            L.append(row)
        L.append("")
        L.append(f"Load average (1/5/15 min) when the case started: {c.get('loadavg_start', '?')}.")
        L.append("")
        runs_txt = "; ".join(
            f"{name}: " + ", ".join(f"{r['wall_s']:.2f}" for r in t["runs"]) for name, t in c["tools"].items())
        L.append(f"Individual wall times (s, in run order): {runs_txt}.")
        L.append("")
        ratio = c.get("ratio_vdisk_qemu")
        if ratio is not None:
            L.append(f"Ratio vdisk/qemu-img: {ratio:.2f}. Verified: {fmt_verified(c)}"
                     f"{' — ' + c['verify_detail'] if c['verify_detail'] else ''}.")
        else:
            L.append(f"Verified: {fmt_verified(c)}.")
        L.append("")

    L.append("## How to run")
    L.append("")
    L.append("```")
    L.append("cargo build --release   # bench/run.sh uses target/release/vdisk as it is")
    L.append("bench/run.sh")
    L.append("```")
    L.append("")
    L.append("Environment knobs:")
    L.append("")
    L.append("- `BENCH_RUNS` (default 3): timed runs per tool and case.")
    L.append("- `BENCH_DROP_CACHES` (default 0): 1 drops the page cache before every timed run "
             "(needs root; falls back to warm caches when not permitted).")
    L.append("- `BENCH_CASES` (default all): space-separated list of case ids to run, e.g. "
             "`BENCH_CASES=\"convert_raw_raw map_qcow2\"`.")
    L.append("- `BENCH_DIR` (default `target/bench`): where inputs are cached and outputs are written.")
    L.append("- `BENCH_SPARSE_CLUSTERS` (default 100000): allocated clusters in the 1 TiB sparse qcow2.")
    L.append("- `VDISK` / `QEMU_IMG` / `QEMU_IO`: binaries to use.")
    L.append("- `BENCH_OUT_MD` / `BENCH_OUT_JSON`: report paths (default `BENCHMARKS.md`, `bench/results.json`).")
    L.append("")
    L.append("Delete `target/bench/` to regenerate the inputs (e.g. after changing `BENCH_SPARSE_CLUSTERS`).")
    L.append("")
    with open(args.md, "w") as f:
        f.write("\n".join(L))


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="sub", required=True)

    r = sub.add_parser("run")
    r.add_argument("--stdout")
    r.add_argument("--stderr")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("case")
    c.add_argument("--results", required=True)
    c.add_argument("--id", required=True)
    c.add_argument("--title", required=True)
    c.add_argument("--kind", choices=["image", "stdout", "none"], required=True)
    c.add_argument("--template", required=True)
    c.add_argument("--tool", action="append", default=[])
    c.add_argument("--input", action="append", default=[])
    c.add_argument("--out-ext", default="")
    c.add_argument("--out-fmt", default="raw")
    c.add_argument("--workdir", required=True)
    c.add_argument("--runs", type=int, default=3)
    c.add_argument("--drop-caches", type=int, default=0)
    c.add_argument("--setup", help="shell command run untimed before every run ({out} replaced)")
    c.add_argument("--expect", help="image every tool's output must compare equal to (kind image)")
    c.add_argument("--object", help="qemu object (a secret) the verification of encrypted outputs needs")
    c.add_argument("--out-image-opts",
                   help="extra --image-opts for opening the outputs in verification (encrypt.key-secret=ID)")
    c.add_argument("--expect-backing",
                   help="with --expect: backing file every tool's output must have (PATH, or none)")
    c.set_defaults(func=cmd_case)

    p = sub.add_parser("report")
    p.add_argument("--results", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--total-runtime", type=float)
    p.set_defaults(func=cmd_report)

    m = sub.add_parser("meta")
    m.add_argument("--out", required=True)
    m.add_argument("--repo", required=True)
    m.add_argument("--vdisk", required=True)
    m.add_argument("--vdisk-snapshot", help="copy of the vdisk binary that the cases run")
    m.add_argument("--qemu-img", required=True)
    m.add_argument("--bench-dir", required=True)
    m.add_argument("--runs", type=int, required=True)
    m.add_argument("--drop-caches", type=int, default=0)
    m.add_argument("--load-note")
    m.add_argument("--input", action="append", default=[], help="NAME|PATH|DESCRIPTION")
    m.set_defaults(func=cmd_meta)

    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
