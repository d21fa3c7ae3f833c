"""Memory of one training epoch over a memory-mapped float16 split larger than the
process should hold.

    python benchmarks/memory.py                 # 1,000,000 x 512 float16 (1 GB on disk)
    python benchmarks/memory.py --full          # 4,000,000 x 512 (4 GB on disk)

Writes the split into a temporary directory (deleted afterwards), runs one epoch of
the real ``xcent train`` (scent, B = 128, C = 360,232) in a child process under
``/usr/bin/time -v``, and reports its peak resident set against the target
``weight + 1.5 GB``. The child's RssAnon (heap: weight, duals, temporaries) and
RssFile (pages of the memory-mapped split counted as resident in the process) are
sampled from /proc, because they answer different questions: RssFile pages are
clean page cache the kernel can drop at any time, RssAnon is what the process
really holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as cm  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--classes", type=int, default=cm.GLINT_CLASSES)
    p.add_argument("--dim", type=int, default=cm.FEATURE_DIM)
    p.add_argument("--val-rows", type=int, default=2000)
    p.add_argument("--full", action="store_true", help="4,000,000 rows")
    p.add_argument("--tmp", default=None)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the child")
    p.add_argument("--release-pages", action="store_true",
                   help="also run xcent train --low-memory true (feature pages unmapped after every batch)")
    a = p.parse_args(argv)
    if a.full:
        a.rows = 4_000_000
    env = cm.child_env("memory.py", argv, a.threads)
    with cm.temp_dir(base=a.tmp) as tmp:
        cm.check_disk(tmp, (a.rows + a.val_rows) * a.dim * 2)
        cm.write_split(tmp / "data" / "train", a.rows, a.classes, a.dim, seed=0)
        cm.write_split(tmp / "data" / "val", a.val_rows, a.classes, a.dim, seed=1)
        cmd = [sys.executable, "-m", "xcent", "train", "--data-dir", str(tmp / "data"), "--out-dir", str(tmp / "out"),
               "--algorithm", "scent", "--epochs", "1", "--batch-size", "128", "--num-classes", str(a.classes),
               "--train-eval-size", "2000", "--device", "cpu", "--name", "mem"]
        variants = [("xcent train (default)", cmd)]
        if a.release_pages:
            variants.append(("xcent train --low-memory true", cmd + ["--overwrite", "true", "--low-memory", "true"]))
        results = []
        for label, command in variants:
            r = cm.run_watched(command, env=env)
            if r["returncode"] != 0:
                print(r["output"][-3000:])
                raise SystemExit("xcent train failed")
            rec = cm.read_jsonl(tmp / "out" / "mem" / "eval_mem.jsonl")[-1]
            results.append((label, r, rec))
    weight = a.classes * a.dim * 4
    data = a.rows * a.dim * 2
    budget = weight + 1.5 * 2**30
    print(f"\n[6] one epoch, {a.rows:,} x {a.dim} float16 memory-mapped ({cm.gib(data)} on disk), "
          f"C = {a.classes:,}, weight {cm.gib(weight)}; target peak RSS <= weight + 1.5 GiB = {cm.gib(budget)}")
    rows = []
    for label, r, rec in results:
        peaks = r["peaks"]
        rows.append([label, f"{r['wall']:.0f}", f"{rec.get('samples_per_second', 0):,.0f}", cm.gib(r["max_rss"]),
                     cm.gib(peaks["RssAnon"]), cm.gib(peaks["RssFile"]), f"{r['max_rss'] / budget:.2f}",
                     cm.verdict(r["max_rss"] <= budget)])
    print(cm.table(["run", "wall s", "train samples/s", "peak RSS (time -v)", "peak RssAnon", "peak RssFile",
                    "RSS / target", "target"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
