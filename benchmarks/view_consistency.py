"""`python -m benchmarks.view_consistency [--seeds N] [--views K ...] [--student-epochs E] [--out FILE.json]`

What view-consistent caches buy an augmenting student, in one run on digits with a 5% label budget (the demo's
task, experiments/digits_transfer.yaml) and per-sample augmentation `crop(padding=1), noise(std=0.3)`: one
teacher, then students of each variant over N seeds:

- online KD: the teacher runs on the student's exact augmented input (the gold standard, slowest);
- clean cache: cached logits of the clean samples (`kd.clean_targets=true`): the targets describe other inputs;
- views K: a cache of K augmented views per sample (`cache.views=K`), the student trains on the drawn view.

Reported per variant: student test accuracy (mean ± std over seeds), mean epoch seconds, cache bytes, and the
mean KL(target used ‖ teacher on the student's actual input) over one epoch of training batches (0 for online
KD and view caches by construction). Runs go to a temporary tracking store; the table is printed and the figures
written as JSON (default benchmarks/results/<date>-<host>-view_consistency.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "digits_transfer.yaml"
AUGMENT = "data.augment=[crop(padding=1), noise(std=0.3)]"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kdtrack-views-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.environ["KDTRACK_CACHE_DIR"] = str(Path(tmp) / "cache")
        os.chdir(tmp)  # ./mlruns of the temporary store
        rows = _experiment(args)
    table = _table(rows, args.seeds)
    print(table)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        f"{datetime.date.today().isoformat()}-{socket.gethostname()}-view_consistency.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
                               "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                               "torch": torch.__version__, "threads": torch.get_num_threads(), "augment": AUGMENT,
                               "rows": rows, "table": table}, indent=2) + "\n")
    print(f"\nreport: {out}", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.view_consistency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="student seeds per variant (default 3)")
    p.add_argument("--views", type=int, nargs="+", default=[1, 4, 16], help="view counts K (default 1 4 16)")
    p.add_argument("--student-epochs", type=int, default=60, help="student epochs (default 60, as the demo)")
    p.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs (default 30, as the demo)")
    p.add_argument("--out", default=None, help="JSON file to write")
    return p


def _experiment(args: argparse.Namespace) -> list[dict]:
    from kdtrack import config, tracking
    from kdtrack.stages import train_student, train_teacher

    base = [AUGMENT, f"student.optim.epochs={args.student_epochs}", "train.progress=off", "experiment=views"]
    teacher = train_teacher.run(config.load(CONFIG, [*base, f"optim.epochs={args.teacher_epochs}"]))
    variants = [("online KD", ["teacher_mode=online"]), ("clean cache", ["kd.clean_targets=true"]),
                *[(f"views K={k}", [f"cache.views={k}"]) for k in args.views]]
    rows = []
    for name, sets in variants:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        accuracies, epoch_seconds, cache_bytes, gap = [], [], None, None
        for seed in range(args.seeds):
            cfg = config.load(CONFIG, [*base, *sets, f"seed={seed}"])
            run = tracking.get_run(train_student.run(cfg, [teacher], build_missing_cache=True))
            accuracies.append(run.data.metrics["test/acc"])
            history = tracking.configure().get_metric_history(run.info.run_id, "epoch_seconds")
            epoch_seconds.append(statistics.fmean(m.value for m in history))
            caches = run.data.tags.get("kdtrack.cache_run_ids")
            if caches:
                cache_bytes = tracking.get_run(caches).data.metrics["cache/bytes"]
            if gap is None:
                gap = target_gap(cfg, teacher)
        rows.append({"variant": name, "accuracies": accuracies, "epoch_seconds": epoch_seconds,
                     "cache_bytes": cache_bytes, "mean_kl": gap})
    return rows


def target_gap(cfg, teacher_run_id: str) -> float:
    """Mean over one epoch of training batches (epoch 0) of KL(p_target ‖ p_teacher(actual input)) at temperature
    T: how far the target a student learns from is from the teacher's answer on the input it actually sees."""
    from kdtrack.data import dataset_digest, distillation_rows, student_dataset
    from kdtrack.models import build_model, spec_from_config
    from kdtrack.stages.distillation import build_distillation
    from kdtrack.teachers import load_teacher

    device = torch.device("cpu")
    teacher = load_teacher(teacher_run_id, device, cfg.cache.checkpoint)
    data = student_dataset(cfg.data)
    train = distillation_rows(data, cfg.cache.splits).with_normalisation(teacher.normalisation)
    student = build_model(spec_from_config(cfg.student.model, data.num_classes, data.input_shape))
    distill = build_distillation(cfg, [teacher], student, train, dataset_digest(train), device,
                                 build_missing_cache=True)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    inner = distill.loss.teacher_logits_fn

    def recorded(batch):
        out = inner(batch)
        seen.append((batch[0], out))
        return out

    distill.loss.teacher_logits_fn = recorded
    temperature, total, count = cfg.kd.temperature, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(train), cfg.data.batch_size):
            rows = torch.arange(start, min(start + cfg.data.batch_size, len(train)))
            distill.training_loss(student, train.batch(rows), 0)
            x, target = seen.pop()
            log_target = torch.log_softmax(target / temperature, dim=1)
            log_live = torch.log_softmax(teacher.model(x) / temperature, dim=1)
            total += float((log_target.exp() * (log_target - log_live)).sum())
            count += len(rows)
    return total / count


def _table(rows: list[dict], seeds: int) -> str:
    lines = [f"| variant | student test acc (mean ± std, {seeds} seeds) | epoch s | cache bytes | mean KL to the "
             "teacher on the actual input |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        acc = row["accuracies"]
        spread = f" ± {statistics.stdev(acc):.4f}" if len(acc) > 1 else ""
        size = f"{row['cache_bytes']:,.0f}" if row["cache_bytes"] else "-"
        lines.append(f"| {row['variant']} | {statistics.fmean(acc):.4f}{spread} | "
                     f"{statistics.fmean(row['epoch_seconds']):.3f} | {size} | {row['mean_kl']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
