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
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from report import cmd_report, loadavg

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


# Longest a timed run may take before it is killed and counted as failed (BENCH_RUN_TIMEOUT, s).
RUN_TIMEOUT_S = float(os.environ.get("BENCH_RUN_TIMEOUT", "1800"))


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
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        # A tool that hangs (qemu-img's curl driver once stalled mid-convert) fails its run
        # instead of holding the whole benchmark: its process group is killed.
        fired = threading.Event()

        def kill_group():
            fired.set()
            os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(RUN_TIMEOUT_S, kill_group)
        watchdog.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        maxrss = ru.ru_maxrss  # Linux: KiB
        if relay_file:
            with open(relay_file) as f:
                lines = f.read().splitlines()
            # "Command exited with non-zero status N" / "Command terminated by signal N" may precede %M
            # Nothing when the watchdog killed GNU time with the tool.
            maxrss = int(lines[-1].strip()) if lines else maxrss
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
        "timed_out": fired.is_set(),
    }


# Times a run killed by the watchdog is run again (BENCH_HANG_RETRIES; for tools known to hang
# now and then, such as qemu-img's curl driver). The hangs are counted in the results.
HANG_RETRIES = int(os.environ.get("BENCH_HANG_RETRIES", "0"))


def measure_retrying(cmd, stdout_path, stderr_path, label):
    """measure(), run again while the watchdog kills it (at most HANG_RETRIES times)."""
    hangs = 0
    while True:
        m = measure(cmd, stdout_path, stderr_path)
        if not m["timed_out"] or hangs >= HANG_RETRIES:
            m["hangs"] = hangs
            return m
        hangs += 1
        print(f"  {label}: hung, killed after {RUN_TIMEOUT_S:.0f} s; running it again", file=sys.stderr, flush=True)


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


def stdout_lines(path, ignore_prefix):
    """The lines of a standard output file, without those that start with ignore_prefix."""
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    return [x for x in lines if not (ignore_prefix and x.startswith(ignore_prefix))]


def reported_seconds(path):
    """The X of qemu-img bench's "Run completed in X seconds." in a standard output file."""
    for line in stdout_lines(path, None):
        if line.startswith("Run completed in "):
            try:
                return float(line.split()[3])
            except (IndexError, ValueError):
                return None
    return None


def median_reported(runs):
    """Median of the run times the tool reported itself, when every run reported one."""
    times = [r.get("reported_s") for r in runs]
    if not times or any(t is None for t in times):
        return None
    return statistics.median(times)


def cmd_case(args):
    tools = []
    for spec in args.tool:
        name, _, path = spec.partition("=")
        tools.append((name, path))
    workdir = args.workdir
    os.makedirs(workdir, exist_ok=True)
    if args.requests and not args.stdout_ignore:
        args.stdout_ignore = "Run completed in "  # the time each tool prints differs, naturally
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
        m = measure_retrying(cmd, stdout_files[name], stderr_files[name], f"{args.id} verification {name}")
        vrun[name] = {
            "hangs": m["hangs"],
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
            same = stdout_lines(stdout_files[v], args.stdout_ignore) == stdout_lines(stdout_files[q], args.stdout_ignore)
            if same:
                n = os.path.getsize(stdout_files[v])
                ignored = f", lines starting with {args.stdout_ignore!r} aside" if args.stdout_ignore else ""
                detail.append(f"stdout identical ({n} bytes{ignored}), exit code {vrun[v]['rc']}")
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
            m = measure_retrying(cmd, stdout_files[name], stderr_files[name], f"{args.id} run {i + 1} {name}")
            m["run"] = i
            m["cold_cache"] = cold
            if args.requests:
                m["reported_s"] = reported_seconds(stdout_files[name])
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
            "median_reported_s": median_reported(runs),
            "rc": vrun[name]["rc"],
            "hangs": vrun[name]["hangs"] + sum(r["hangs"] for r in runs),
            "stderr": vrun[name]["stderr"],
            "output_size": vrun[name]["output_size"],
            "stdout_bytes": vrun[name]["stdout_bytes"],
        }
    v, q = result["tools"].get("vdisk"), result["tools"].get("qemu-img")
    if v and q and v["median_reported_s"] and q["median_reported_s"]:
        # The tools timed their own requests: compare that, not the open and close around it.
        result["ratio_vdisk_qemu"] = v["median_reported_s"] / q["median_reported_s"]
    elif v and q and v["median_wall_s"] and q["median_wall_s"]:
        result["ratio_vdisk_qemu"] = v["median_wall_s"] / q["median_wall_s"]
    else:
        result["ratio_vdisk_qemu"] = None
    result["cold_cache"] = bool(cold_flags) and all(cold_flags)
    result["runs"] = args.runs
    if args.requests:
        result["requests"] = args.requests
    if args.floor_for:
        result["floor_for"] = args.floor_for
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
    c.add_argument("--stdout-ignore", help="kind stdout: lines starting with this are not compared")
    c.add_argument("--requests", type=int,
                   help="requests per run: the tools print their own run time (qemu-img bench), used for "
                        "the ratio and for IOPS")
    c.add_argument("--floor-for", help="reference case: its median is the floor of cases reading this input")
    c.set_defaults(func=cmd_case)

    p = sub.add_parser("report")
    p.add_argument("--results", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--total-runtime", type=float)
    p.add_argument("--svg", help="where to write the chart of the ratios (linked from the report)")
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
