"""Calibration and adaptation study on the synthetic domains: many small kdreid runs at once, one table.

For each `--gap` value it writes the four synthetic domains, then runs (as parallel processes, so that a GPU or
many cores are kept busy by small models):

- `kdreid pipeline --preset quick` (synth_msmt -> synth_market, synth_duke, synth_cuhk) for each
  `--combo TEACHER:STUDENT`: source-only, teachers (D-MMD, tracklets), blend, student;
- in-domain training of the teacher architecture on each target (its own labels; the calibration's reference);
- adaptation ablations from the first combo's source model, for each target: `--dmmd-weight 0` (the control:
  the same schedule, AdaBN effect included, no D-MMD), and with `--ablations`, pseudo-label and oracle grouping.

It prints one row per (gap, target): in-domain mAP, source-only mAP and their ratio (the calibration asks for
0.25-0.5), teacher / control / pseudo / oracle, blend and student; and writes study.json and study.md.
`--calibration` runs only what the calibration needs: the source stage of the teacher architecture (evaluated on
the targets: source-only) and the in-domain runs.

    python bench/synth_study.py --out /tmp/study --scale 0.1 --gaps 1.0 0.5 --jobs 12 --deadline 480
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SOURCE = "synth_msmt"
TARGETS = ["synth_market", "synth_duke", "synth_cuhk"]


def kdreid(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from kdreid.cli import command; sys.exit(command())", *args]


class Pool:
    """Subprocesses with a concurrency cap; a job may wait for a file (another job's model) before it starts."""

    def __init__(self, jobs: int, deadline: float, log_dir: Path, extra: list[str]):
        self.cap, self.deadline, self.log_dir, self.extra = jobs, deadline, log_dir, extra
        self.waiting: list[tuple[str, list[str], Path | None]] = []
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        self.done: dict[str, int] = {}

    def add(self, name: str, command: list[str], needs: Path | None = None) -> None:
        self.waiting.append((name, command + self.extra, needs))

    def run(self) -> None:
        while self.waiting or self.running:
            for name, (process, started) in list(self.running.items()):
                code = process.poll()
                if code is not None:
                    self.done[name] = code
                    del self.running[name]
                    print(f"[{time.time() - START:6.0f} s] {name}: exit {code} ({time.time() - started:.0f} s)", flush=True)
            if time.time() > self.deadline:
                for name, (process, _) in self.running.items():
                    process.kill()
                    self.done[name] = -9
                    print(f"deadline: killed {name}", flush=True)
                for name, _, _ in self.waiting:
                    self.done[name] = -1
                    print(f"deadline: never started {name}", flush=True)
                return
            for item in list(self.waiting):
                name, command, needs = item
                if len(self.running) >= self.cap:
                    break
                if needs is not None and not needs.exists():
                    continue
                self.waiting.remove(item)
                log = open(self.log_dir / f"{name}.log", "w")
                self.running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), time.time())
            time.sleep(0.5)


def final_map(path: Path, dataset: str) -> float | None:
    try:
        return json.loads(path.read_text())["final"][dataset]["mAP"]
    except (OSError, KeyError, ValueError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--size", default="64x32")
    parser.add_argument("--gaps", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--combo", nargs="+", default=["resnet18:osnet_x0_25"], help="TEACHER:STUDENT pairs")
    parser.add_argument("--ablations", action="store_true", help="also pseudo-label and oracle grouping")
    parser.add_argument("--calibration", action="store_true",
                        help="only the source stage (source-only on the targets) and the in-domain runs")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic domains (another draw of "
                        "identities and cameras: the calibration's spread)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds; jobs still running are killed")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags added to every training run")
    args = parser.parse_args()

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    pool = Pool(args.jobs, START + args.deadline, out / "logs", args.extra)
    teacher = args.combo[0].split(":")[0]
    for gap in args.gaps:
        data = out / f"data_g{gap}"
        subprocess.run(kdreid("data", "synth", "--out", str(data), "--scale", str(args.scale), "--size", args.size,
                              "--gap", str(gap), "--seed", str(args.data_seed), "--workers", str(args.workers)),
                       check=True, stdout=subprocess.DEVNULL)
        print(f"[{time.time() - START:6.0f} s] data gap {gap} written", flush=True)
        root = ["--root", str(data), "--preset", "quick"]
        if args.calibration:
            pool.add(f"g{gap}_source_{teacher}", kdreid(
                "train-source", "-s", SOURCE, "-t", *TARGETS, "-a", teacher,
                "--out", str(out / f"g{gap}_source_{teacher}"), *root))
        for combo in ([] if args.calibration else args.combo):
            t, s = combo.split(":")
            pool.add(f"g{gap}_pipeline_{t}_{s}", kdreid(
                "pipeline", "-s", SOURCE, "-t", *TARGETS, "--teacher-arch", t, "--student-arch", s,
                "--out", str(out / f"g{gap}_pipeline_{t}_{s}"), *root))
        source_model = out / f"g{gap}_pipeline_{args.combo[0].replace(':', '_')}" / "stages" / f"source_{teacher}" / "model.pt"
        for target in TARGETS:
            pool.add(f"g{gap}_indomain_{target}", kdreid(
                "train-source", "-s", target, "-a", teacher, "--out", str(out / f"g{gap}_indomain_{target}"), *root))
            variants = {} if args.calibration else {"control": ["--dmmd-weight", "0"]}
            if args.ablations and not args.calibration:
                variants.update(pseudo=["--grouping", "pseudo"], oracle=["--grouping", "oracle"])
            for variant, flags in variants.items():
                pool.add(f"g{gap}_{variant}_{target}", kdreid(
                    "adapt", "-s", SOURCE, "-t", target, "--init", str(source_model),
                    "--out", str(out / f"g{gap}_{variant}_{target}"), *flags, *root), needs=source_model)
    pool.run()

    rows = []
    for gap in args.gaps:
        for combo in args.combo:
            pipeline = out / f"g{gap}_pipeline_{combo.replace(':', '_')}"
            try:
                shape = json.loads((pipeline / "metrics.json").read_text())
            except (OSError, ValueError):
                shape = {}
            stages = pipeline / "stages"
            for target in TARGETS:
                row = {"gap": gap, "combo": combo, "target": target,
                       "in_domain": final_map(out / f"g{gap}_indomain_{target}" / "metrics.json", target)}
                for key in ("source_only", "source_only_student", "teachers", "blend", "student"):
                    row[key] = shape.get(key, {}).get(target, {}).get("mAP")
                if row["source_only"] is None:  # no finished pipeline: the source stage on its own
                    teacher_arch = combo.split(":")[0]
                    row["source_only"] = (final_map(stages / f"source_{teacher_arch}" / "metrics.json", target)
                                          or final_map(out / f"g{gap}_source_{teacher_arch}" / "metrics.json", target))
                if row["teachers"] is None:  # the pipeline did not finish: read the teacher stage itself
                    row["teachers"] = final_map(stages / f"teacher_{target}" / "metrics.json", target)
                for variant in ("control", "pseudo", "oracle"):
                    row[variant] = final_map(out / f"g{gap}_{variant}_{target}" / "metrics.json", target)
                if row["source_only"] is not None and row["in_domain"]:
                    row["ratio"] = row["source_only"] / row["in_domain"]
                rows.append(row)
    columns = ["gap", "combo", "target", "in_domain", "source_only", "ratio", "teachers", "control", "pseudo",
               "oracle", "source_only_student", "blend", "student"]

    def cell(value):
        return "—" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    text = "\n".join(table) + "\n"
    print(text)
    (out / "study.md").write_text(text)
    (out / "study.json").write_text(json.dumps({"args": vars(args), "rows": rows, "exit": pool.done}, indent=1))
    return 0


START = time.time()

if __name__ == "__main__":
    sys.exit(main())
