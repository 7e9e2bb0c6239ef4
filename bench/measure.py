#!/usr/bin/env python3
"""Runs one command and measures it: wall time, CPU time (user + sys) and peak RSS.

CPU time and peak RSS come from the kernel's accounting of the child (`os.wait4`, the same
numbers as `/usr/bin/time -v`; they include the child's own waited-for children). While the
child runs, /proc/PID/status is sampled every `--interval` seconds to split the resident set
into anonymous memory (heap: what the tool allocated) and file-backed pages (mmap'd inputs
that the kernel may drop at any time); these two peaks are sampled, so they can miss a short
spike, and they cover the main process only.

    python3 bench/measure.py --json result.json -- CMD ARGS...

Prints the JSON result on stdout (or writes it to --json); the child's stdout/stderr go to
--log (default: inherited). Stdlib only.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def _status_kb(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def measure(cmd, log=None, interval=0.05, env=None, cwd=None):
    """Runs `cmd` (a list) to completion and returns the measurements as a dict."""
    out = open(log, "wb") if log else None
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env, cwd=cwd)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            s = _status_kb(proc.pid)
            for k in peaks:
                peaks[k] = max(peaks[k], s.get(k, 0))
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # wait4 reaps the child and returns its rusage; Popen must not reap it first.
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if out:
        out.close()
    return {
        "cmd": cmd,
        "rc": proc.returncode,
        "wall_s": wall,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "max_rss_kb": ru.ru_maxrss,
        "peak_anon_kb_sampled": peaks["RssAnon"],
        "peak_file_kb_sampled": peaks["RssFile"],
        "major_faults": ru.ru_majflt,
        "minor_faults": ru.ru_minflt,
        "vol_ctx_switches": ru.ru_nvcsw,
        "invol_ctx_switches": ru.ru_nivcsw,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the result here instead of stdout")
    ap.add_argument("--log", help="child's stdout+stderr go here")
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("give a command after --")
    r = measure(cmd, log=a.log, interval=a.interval)
    text = json.dumps(r, indent=2)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    sys.exit(0 if r["rc"] == 0 else 1)


if __name__ == "__main__":
    main()
