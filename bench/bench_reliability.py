"""Crash recovery in figures: SIGKILL `lmstack pretrain` and `lmstack data clean` at seeded moments.

    python bench/bench_reliability.py                          # 20 training kills, 5 clean kills
    python bench/bench_reliability.py --kills 50 --seed 3      # more kills, other moments
    python bench/bench_reliability.py --json bench/results/reliability/run.json

1. **Training kills.** A tiny token set is built from Python standard-library sources (`lmstack tokenizer
   train`, `lmstack data tokenize`), and a tiny GPT (2 layers, 64 wide) is pretrained once without
   interruption. The same command then runs in a fresh directory and is SIGKILLed ``--kills`` times,
   resuming with ``--resume`` after each kill until it finishes. The kill targets are drawn from a seeded
   RNG, uniform over the reference run's timeline in steps (start-up and seconds per step fitted from
   when its checkpoints appeared; the final model write and plots included); a target the last
   checkpoint already passed becomes a start-up kill. Each kill is a *timer* kill at its target, or a
   *write* kill that starts polling a little before it and kills the moment a new
   checkpoint or final-model staging directory (``.NAME.tmp-XXXX``, lmstack.atomic) appears. A kill
   counts as landing inside a checkpoint write when a staging leftover is on disk right after the
   process died. The final ``model/model.safetensors`` must equal the uninterrupted run's bit for bit,
   and metrics.jsonl must hold the same steps with the same losses.
2. **Data kills.** `lmstack data clean` over a JSONL corpus (standard-library sources in 60-line
   documents, small shards so a run writes several) is SIGKILLed ``--data-kills`` times, each in a fresh
   output directory at a moment uniform over [0.3, 0.85] x the uninterrupted clean's wall time. After
   each kill `lmstack data tokenize` on the half-written output must exit 2 with one line (the
   ``_INCOMPLETE`` refusal); re-running the same clean must then finish and its shards must hold the
   same documents as the uninterrupted clean's.

Every child runs ``python -m lmstack.cli`` with one CPU thread (OMP_NUM_THREADS=1, train.device=cpu,
fp32), so runs are deterministic and the defaults take a few minutes on a 2-core machine. Results are
printed as Markdown tables (and written as JSON with ``--json``). Caveats: a kill's moment is a wall-clock
moment, so which step or file it hits varies with machine load even for one seed; the seed fixes the
kinds and the delays, not the exact landing points. Kills landing during interpreter start-up are
real kills too, but they test little beyond "nothing was written yet". When a session finishes before
its kill is due (a late target, or a write kill that missed the short final write), the run is done and
the remaining kills are not made: "kills attempted" can be below ``--kills``.
"""

from __future__ import annotations

import argparse
import inspect
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# standard-library modules whose source is the text: always present, real prose-and-code, no download
SOURCE_MODULES = ("argparse", "textwrap", "string", "shlex", "json.decoder", "json.encoder", "difflib", "csv",
                  "fractions", "statistics", "calendar", "heapq", "bisect", "ast", "dataclasses", "enum",
                  "functools", "pathlib", "tempfile", "shutil")
POLL_SECONDS = 0.0005  # staging-directory poll interval of write kills: checkpoint writes here take milliseconds


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("LMSTACK_CACHE", None)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmstack.cli", *args]


def run_cli(args: list[str], log: Path) -> subprocess.CompletedProcess:
    """Run one lmstack command to completion; stdout+stderr go to LOG (and come back in the result)."""
    result = subprocess.run(args, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(result.stdout)
    return result


def write_sources(directory: Path) -> list[str]:
    """The standard-library sources as 60-line documents: DIR/docs.jsonl and DIR/text/<module>.txt."""
    (directory / "text").mkdir(parents=True)
    documents = []
    for name in SOURCE_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        (directory / "text" / f"{name}.txt").write_text(source)
        lines = source.splitlines()
        documents += [{"id": f"{name}:{i}", "text": "\n".join(lines[i:i + 60])} for i in range(0, len(lines), 60)]
    with open(directory / "docs.jsonl", "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in documents)
    return [doc["id"] for doc in documents]


# ----------------------------------------------------------------------------- training kills

def staging_leftovers(run: Path) -> list[str]:
    """Names of atomic-write leftovers (.NAME.tmp-XXXX / .NAME.old-PID) in RUN and RUN/checkpoints."""
    found = []
    for directory in (run, run / "checkpoints"):
        try:
            found += [f"{directory.name}/{n}" for n in os.listdir(directory)
                      if n.startswith(".") and (".tmp-" in n or ".old-" in n)]
        except FileNotFoundError:
            pass
    return found


def checkpoint_writes(leftovers: list[str]) -> list[str]:
    """The leftovers that are checkpoint or final-model writes (not e.g. the metrics file's atomic rewrite)."""
    return [n for n in leftovers if n.startswith("checkpoints/.step_") or n.split("/")[-1].startswith(".model.")]


def newest_step(run: Path) -> int:
    steps = [int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*") if p.name.split("_")[1].isdigit()]
    return max(steps, default=0)


@dataclass
class Session:
    """One process of the killed run."""

    kind: str  # timer | write | final (the last session, never killed)
    delay: float  # seconds after start the kill was due (timer) or polling began (write)
    start_step: int  # newest checkpoint step when the session started
    returncode: int | None = None
    killed: bool = False
    during_write: bool = False
    leftovers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    traceback: bool = False


def run_session(args: list[str], run: Path, kind: str, delay: float, log: Path) -> Session:
    """Start ARGS; for a timer kill SIGKILL it after DELAY s, for a write kill poll for a staging
    directory from DELAY s on and SIGKILL it as soon as one appears; a final session runs to the end."""
    session = Session(kind=kind, delay=delay, start_step=newest_step(run))
    earlier = set(staging_leftovers(run))  # an earlier kill's leftovers, removed when this session starts
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        if kind == "timer":
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                session.killed = True
        elif kind == "write":
            time.sleep(delay)
            while proc.poll() is None:
                if checkpoint_writes(sorted(set(staging_leftovers(run)) - earlier)):
                    proc.send_signal(signal.SIGKILL)
                    session.killed = True
                    break
                time.sleep(POLL_SECONDS)
        session.returncode = proc.wait()
    session.seconds = time.perf_counter() - start
    session.leftovers = sorted(set(staging_leftovers(run)) - earlier) if session.killed else []
    session.during_write = bool(checkpoint_writes(session.leftovers))
    session.traceback = "Traceback" in log.read_text()
    return session


def pretrain_args(shards: Path, run: Path, steps: int, ckpt_every: int, resume: bool) -> list[str]:
    overrides = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.n_kv_head=2",
                 f"train.max_steps={steps}", f"train.ckpt_every={ckpt_every}", "train.eval_every=50",
                 "train.eval_batches=2", "train.log_every=5", "train.batch_size=4", "train.seq_len=64",
                 "train.device=cpu", "train.dtype=fp32", "train.tensorboard=false", "train.keep_last=2",
                 "optim.warmup_steps=10"]
    return cli("pretrain", "--data", str(shards), "--out", str(run), "--preset", "tiny",
               *(["--resume"] if resume else []), *overrides)


def compare_weights(a: Path, b: Path) -> tuple[bool, float]:
    """(bit-identical, max |a - b|) over the tensors of two safetensors files."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return False, float("inf")
    identical = all(torch.equal(x[k], y[k]) for k in x)
    diff = max(((x[k].double() - y[k].double()).abs().max().item() for k in x), default=0.0)
    return identical, diff


def read_losses(path: Path) -> dict[tuple[str, int], float]:
    """{(metric, step): value} for the train and val losses of a metrics.jsonl."""
    losses = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for key in ("loss", "val_loss"):
            if key in row:
                losses[(key, row["step"])] = row[key]
    return losses


def training_kills(work: Path, kills: int, steps: int, ckpt_every: int, write_share: float,
                   rng: random.Random) -> dict:
    source = work / "source"
    run_cli(cli("tokenizer", "train", "--input", str(source / "text"), "--vocab-size", "512", "--out",
                str(work / "tok"), "--no-progress"), work / "tokenizer.log").check_returncode()
    run_cli(cli("data", "tokenize", str(source / "text"), "--tokenizer", str(work / "tok"), "--out",
                str(work / "shards"), "--val-fraction", "0.1", "--workers", "0"),
            work / "tokenize.log").check_returncode()

    # the uninterrupted reference, watched to learn how long start-up (to the first checkpoint) takes
    reference = work / "reference"
    start = time.perf_counter()
    with open(work / "reference.log", "w") as out:
        proc = subprocess.Popen(pretrain_args(work / "shards", reference, steps, ckpt_every, False),
                                env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        seen: dict[int, float] = {}  # checkpoint step -> seconds after start it appeared
        while proc.poll() is None:
            step = newest_step(reference) if (reference / "checkpoints").is_dir() else 0
            if step and step not in seen:
                seen[step] = time.perf_counter() - start
            time.sleep(0.002)
    reference_seconds = time.perf_counter() - start
    if proc.returncode != 0 or len(seen) < 2:
        raise SystemExit(f"the uninterrupted run failed or wrote too few checkpoints; see {work / 'reference.log'}")
    (first, t_first), (last, t_last) = min(seen.items()), max(seen.items())
    step_seconds = (t_last - t_first) / (last - first)
    startup = t_first - first * step_seconds  # process start to the first training step
    final_steps = (reference_seconds - t_last) / step_seconds  # the final model write, plots, exit, in steps
    # kill targets on the training timeline, in steps: uniform over the whole run, the final phase included
    targets = sorted(rng.uniform(0, steps + final_steps) for _ in range(kills))

    killed = work / "killed"
    sessions: list[Session] = []
    start = time.perf_counter()
    for number in range(kills + 1):
        if number == kills:
            kind, delay = "final", 0.0
        else:
            # a target the last checkpoint already passed (two targets between checkpoints) is a start-up kill
            ahead = targets[number] - newest_step(killed)
            delay = startup + ahead * step_seconds if ahead > 0 else rng.uniform(0.3, 1.0) * startup
            kind = "write" if rng.random() < write_share else "timer"
            if kind == "write":  # start polling a little before the target: the next checkpoint write is hit
                delay = max(0.0, delay - ckpt_every * step_seconds)
        session = run_session(pretrain_args(work / "shards", killed, steps, ckpt_every, resume=number > 0),
                              killed, kind, delay, work / f"session_{number:03d}.log")
        sessions.append(session)
        if not session.killed and session.returncode == 0:
            break  # finished before its kill was due: no more kills to make
        if not session.killed:
            raise SystemExit(f"session {number} exited {session.returncode} without a kill; "
                             f"see {work / f'session_{number:03d}.log'}")
    if sessions[-1].killed or sessions[-1].returncode != 0:
        session = run_session(pretrain_args(work / "shards", killed, steps, ckpt_every, True), killed, "final", 0.0,
                              work / "session_final.log")
        sessions.append(session)
    killed_seconds = time.perf_counter() - start

    finished = sessions[-1].returncode == 0 and (killed / "model" / "model.safetensors").is_file()
    identical, max_diff = (compare_weights(reference / "model" / "model.safetensors",
                                           killed / "model" / "model.safetensors") if finished else (False, float("nan")))
    ref_losses, got_losses = read_losses(reference / "metrics.jsonl"), read_losses(killed / "metrics.jsonl")
    shared = ref_losses.keys() & got_losses.keys()
    return {
        "steps": steps, "ckpt_every": ckpt_every, "reference_seconds": reference_seconds, "startup_seconds": startup,
        "step_seconds": step_seconds, "kill_targets": targets,
        "kills_attempted": sum(s.kind != "final" for s in sessions),
        "kills_landed": sum(s.killed for s in sessions),
        "kills_during_checkpoint_write": sum(s.during_write for s in sessions),
        "write_kills": sum(s.kind == "write" for s in sessions),
        "resumes": len(sessions) - 1,
        "sessions_with_progress": sum(b.start_step > a.start_step for a, b in zip(sessions, sessions[1:])),
        "tracebacks": sum(s.traceback for s in sessions),
        "finished": finished,
        "weights_identical": identical, "weights_max_abs_diff": max_diff,
        "metric_rows_reference": len(ref_losses), "metric_rows_killed": len(got_losses),
        "metric_rows_same_steps": ref_losses.keys() == got_losses.keys(),
        "loss_max_abs_diff": max((abs(ref_losses[k] - got_losses[k]) for k in shared), default=float("nan")),
        "killed_run_seconds": killed_seconds,
        "sessions": [asdict(s) for s in sessions],
    }


# ----------------------------------------------------------------------------- data kills

def shard_documents(directory: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted(directory.glob("shard_*.jsonl")) for line in open(shard)]


def clean_args(corpus: Path, out: Path) -> list[str]:
    return cli("data", "clean", str(corpus), "--out", str(out), "--quiet", "--set", "output.shard_docs=40")


def data_kills(work: Path, kills: int, rng: random.Random) -> dict:
    corpus, tokenizer = work / "source" / "docs.jsonl", work / "tok"
    start = time.perf_counter()
    run_cli(clean_args(corpus, work / "clean_reference"), work / "clean_reference.log").check_returncode()
    reference_seconds = time.perf_counter() - start
    expected = shard_documents(work / "clean_reference")

    rows = []
    for number in range(kills):
        out, delay = work / f"clean_{number:02d}", rng.uniform(0.3, 0.85) * reference_seconds
        with open(work / f"clean_{number:02d}_killed.log", "w") as log:
            proc = subprocess.Popen(clean_args(corpus, out), env=child_env(), stdout=log, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=delay)
                killed = False
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = True
        marker = (out / "_INCOMPLETE").is_file()
        finished_before_kill = not marker and (out / "report.json").is_file()
        refusal = run_cli(cli("data", "tokenize", str(out), "--tokenizer", str(tokenizer), "--out",
                              str(work / f"tokenized_{number:02d}"), "--workers", "0"),
                          work / f"clean_{number:02d}_tokenize.log")
        refusal_lines = refusal.stdout.strip().splitlines()
        rerun = run_cli(clean_args(corpus, out), work / f"clean_{number:02d}_rerun.log")
        refused = refusal.returncode == 2 and len(refusal_lines) == 1
        rows.append({"delay": delay, "killed": killed, "incomplete_marker": marker,
                     "finished_before_kill": finished_before_kill,
                     "tokenize_as_expected": refused if marker else (finished_before_kill and refusal.returncode == 0),
                     "shards_before_rerun": len(list(out.glob("shard_*"))),
                     "tokenize_exit": refusal.returncode, "tokenize_lines": len(refusal_lines),
                     "tokenize_message": refusal_lines[-1] if refusal_lines else "",
                     "rerun_exit": rerun.returncode, "rerun_traceback": "Traceback" in rerun.stdout,
                     "marker_after_rerun": (out / "_INCOMPLETE").exists(),
                     "same_documents": rerun.returncode == 0 and shard_documents(out) == expected})
    return {"reference_seconds": reference_seconds, "reference_documents": len(expected), "kills": rows}


# ----------------------------------------------------------------------------- report

def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def print_tables(train: dict, data: dict) -> None:
    print("\n### Training: SIGKILL + `--resume`\n")
    print("| kills attempted | landed | during a checkpoint write | resumes | sessions that advanced a checkpoint "
          "| final weights identical | max abs diff | losses at the same steps (max abs diff) | tracebacks "
          "| wall time (killed run / uninterrupted) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {train['kills_attempted']} | {train['kills_landed']} | {train['kills_during_checkpoint_write']} "
          f"(of {train['write_kills']} write kills) | {train['resumes']} | {train['sessions_with_progress']} "
          f"| {yes_no(train['weights_identical'])} | {train['weights_max_abs_diff']:.3g} "
          f"| {yes_no(train['metric_rows_same_steps'])} ({train['metric_rows_killed']} rows, "
          f"{train['loss_max_abs_diff']:.3g}) | {train['tracebacks']} "
          f"| {train['killed_run_seconds']:.1f} s / {train['reference_seconds']:.1f} s |")
    print(f"\n{train['steps']} steps, a checkpoint every {train['ckpt_every']}; start-up "
          f"{train['startup_seconds']:.1f} s, {1000 * train['step_seconds']:.0f} ms per step (checkpoint included).")
    print("\n### Data: SIGKILL `lmstack data clean`, then tokenize the half-written output, then re-run\n")
    print("| kill | at (s) | landed | output finished before the kill | _INCOMPLETE left | shards on disk "
          "| tokenize exit (lines) | tokenize as expected | re-run exit | output equals uninterrupted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, row in enumerate(data["kills"]):
        print(f"| {i} | {row['delay']:.2f} | {yes_no(row['killed'])} | {yes_no(row['finished_before_kill'])} "
              f"| {yes_no(row['incomplete_marker'])} "
              f"| {row['shards_before_rerun']} | {row['tokenize_exit']} ({row['tokenize_lines']}) "
              f"| {yes_no(row['tokenize_as_expected'])} "
              f"| {row['rerun_exit']} | {yes_no(row['same_documents'])} |")
    print(f"\nuninterrupted clean: {data['reference_seconds']:.1f} s, {data['reference_documents']} documents kept.")
    messages = {row["tokenize_message"] for row in data["kills"] if row["tokenize_exit"] == 2}
    for message in sorted(messages):
        print(f"tokenize refusal: `{message}`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the training run")
    parser.add_argument("--data-kills", type=int, default=5, help="SIGKILLs of `lmstack data clean`")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kinds and moments of the kills")
    parser.add_argument("--steps", type=int, default=300, help="train.max_steps of the tiny run")
    parser.add_argument("--ckpt-every", type=int, default=5, help="train.ckpt_every of the tiny run")
    parser.add_argument("--write-share", type=float, default=0.3,
                        help="share of training kills aimed at a checkpoint write")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep every run and log here (unset = a temporary directory, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lmstack-reliability-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_sources(work / "source")
        rng = random.Random(args.seed)
        train = training_kills(work, args.kills, args.steps, args.ckpt_every, args.write_share, rng)
        data = data_kills(work, args.data_kills, rng)
        print_tables(train, data)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "training": train, "data": data}, indent=2) + "\n")


if __name__ == "__main__":
    main()
