"""Audit of malformed inputs across every entry point: run on demand (not in CI), prints one table.

    .venv/bin/python scripts/audit/audit_inputs.py                 # every case (about 10 minutes on 2 busy cores)
    .venv/bin/python scripts/audit/audit_inputs.py --only launcher --verbose
    .venv/bin/python scripts/audit/audit_inputs.py --repo /path/to/other/checkout   # audit another checkout

Every case (scripts/audit/audit_cases.py) feeds one malformed input - a flag value, a file, an environment variable
of a launcher - to one entry point (train, preprocess, eval, plan, make_tiny, compare, diversity, pretrain_toy, the
benchmarks, the shell launchers) in a scratch folder of its own, and says what a good answer names. Inputs are cheap:
the toy backbone, files of a few bytes; the launchers run with a `python` that only prints what it was asked to run
and a `bash` that refuses to run env_setup.sh, so no case installs, downloads or loads a large model.

Each case is judged by these rules, in this order (the first that applies gives its column):
- data lost: a file the case put in place outside the output folder (or a result it marks as to be kept) is missing
  or changed afterwards.
- traceback: "Traceback" in the output, an exit code outside the documented table (0, 2 input, 3 halted, 4
  environment; 1 is an uncaught exception), or no answer within the time limit.
- silently accepted: the case expects a refusal and the exit code is 0; or it expects a warning and no warning line
  names what it should; or (launchers) the command the launcher built lacks what the variable asked for.
- misleading: a refusal whose exit code is not the expected one, or whose stderr does not end with exactly one
  `error: ...` line, or whose error line does not name the flag / file / variable (every expected string must be in
  it), or which prints argparse's usage text.
- clear: none of the above.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_cases import Case, build_cases  # noqa: E402

COLUMNS = ("clear", "traceback", "misleading", "silently accepted", "data lost")
EXIT_CODES = {0, 2, 3, 4}


def snapshot(root: Path, skip: Path | None, keep: tuple[Path, ...]) -> dict[str, str]:
    """sha256 of every file under `root`, except under `skip` (the output folder) unless listed in `keep`."""
    out = {}
    for path in sorted(root.rglob("*")):
        inside_skip = skip is not None and (path == skip or skip in path.parents)
        if path.is_file() and (not inside_skip or any(path == k or k in path.parents for k in keep)):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def shims(root: Path, real_python: str) -> Path:
    """A folder for PATH and PYTHON: `python` prints the module a launcher runs with its arguments (the real
    interpreter for `-c` snippets), `bash` refuses env_setup.sh (it would install packages)."""
    folder = root / "shims"
    folder.mkdir()
    (folder / "python").write_text(
        "#!/bin/bash\n"
        f'if [[ "$1" == "-c" ]]; then exec {real_python} "$@"; fi\n'
        'printf "LAUNCHED"; printf " %q" "$@"; echo\n')
    (folder / "bash").write_text(
        "#!/bin/bash\n"
        'if [[ "$(basename -- "${1:-}")" == "env_setup.sh" ]]; then echo "ENV_SETUP_RAN" >&2; exit 0; fi\n'
        'exec /bin/bash "$@"\n')
    for name in ("python", "bash"):
        (folder / name).chmod(0o755)
    return folder


def fill(template: str, values: dict) -> str:
    """`template` with {w}, {out}, ... replaced (other braces, e.g. of JSON, stay)."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def run_case(case: Case, ctx: dict, timeout: float) -> tuple[str, str, float, str]:
    """(column, reason, seconds, output tail) of one case."""
    work = ctx["root"] / "cases" / case.id
    work.mkdir(parents=True)
    (work / "cwd").mkdir()
    (work / "cwd" / "notes.txt").write_text("the user's own file, beside the command\n")
    out = work / "out"
    mounted = case.setup(work, ctx) if case.setup else None
    keep = tuple(out / k for k in case.keep)
    before = snapshot(work, out, keep)
    fmt = dict(w=str(work), out=str(out), emb=ctx["emb"], repo=ctx["repo"], run=ctx["run"])
    argv = [fill(a, fmt) for a in case.argv]
    env = dict(ctx["env"], **{k: fill(v, fmt) for k, v in case.env.items()})
    if case.kind == "launcher":
        cmd, cwd = ["/bin/bash", str(Path(ctx["repo"]) / argv[0]), *argv[1:]], ctx["repo"]
        env.update(PYTHON=str(ctx["shims"] / "python"), PATH=f"{ctx['shims']}:{env['PATH']}")
    else:
        cmd, cwd = [ctx["python"], "-m", *argv], str(work / "cwd")
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, stdout, stderr = None, str(err.stdout or ""), str(err.stderr or "")
    took = time.time() - start
    if mounted:
        subprocess.run(["umount", mounted], check=False)
    after = snapshot(work, out, keep)
    case = dataclasses.replace(case, names=tuple(fill(n, fmt) for n in case.names))
    column, reason = judge(case, rc, stdout, stderr, before, after)
    return column, reason, took, (stderr.strip().splitlines() or [""])[-1][:200]


def judge(case: Case, rc, stdout: str, stderr: str, before: dict, after: dict) -> tuple[str, str]:
    lost = [p for p, digest in before.items() if after.get(p) != digest]
    if lost:
        return "data lost", f"{len(lost)} file(s) deleted or changed, e.g. {lost[0]}"
    if rc is None:
        return "traceback", "no answer within the time limit"
    if "Traceback" in stdout + stderr or rc not in EXIT_CODES:
        return "traceback", f"exit code {rc}" + (", traceback" if "Traceback" in stdout + stderr else "")
    lines = [line for line in stderr.splitlines() if line.strip()]
    warnings = [line for line in lines if "warning" in line.lower()]
    for name in case.warns:
        if not any(name in line for line in warnings):
            return "silently accepted", f"no warning naming {name!r}"
    if case.expect == "warn":
        return "clear", "warned"
    if case.expect == "launch":
        launched = [line for line in stdout.splitlines() if line.startswith("LAUNCHED")]
        if rc != 0 or not launched:
            return "misleading", f"exit code {rc}, nothing launched"
        missing = [t for t in case.names if not any(t in line.split() for line in launched)]
        return ("silently accepted", f"launched without {missing}") if missing else ("clear", "launched as asked")
    if rc == 0:
        return "silently accepted", "exit code 0"
    errors = [line for line in lines if line.startswith("error: ")]
    if "usage:" in stderr:
        return "misleading", "prints the usage text"
    if len(errors) != 1 or errors[0] != lines[-1]:
        return "misleading", f"{len(errors)} error lines, last line {lines[-1][:80] if lines else ''!r}"
    if rc != case.code:
        return "misleading", f"exit code {rc}, expected {case.code}"
    missing = [name for name in case.names if name not in errors[0]]
    if missing:
        return "misleading", f"error line does not name {missing}"
    return "clear", "one line naming " + ", ".join(case.names)


def prepare(root: Path, repo: str, python: str) -> dict:
    """Shared inputs: toy embeddings (train, eval) and a finished one-iteration toy run with a checkpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHGRPO_")}
    env.update(PYTHONPATH=repo, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled", TMPDIR=str(root / "tmp"))
    (root / "tmp").mkdir()
    emb = root / "emb"
    for split in ("train", "eval"):
        path = subprocess.run([python, "-c", f"from branchgrpo.toy.data import {split}_prompts_path as p; print(p())"],
                              env=env, capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run([python, "-m", "branchgrpo.cli.preprocess", "--model", "toy", "--device", "cpu", "--prompts",
                        path, "--output_dir", str(emb / split), "--shard_size", "64"], env=env, check=True,
                       capture_output=True)
    run = root / "finished_run"
    subprocess.run([python, "-m", "branchgrpo.cli.train", *toy_flags(str(emb), str(run)), "--checkpointing_steps", "1"],
                   env=env, check=True, capture_output=True)
    return dict(root=root, repo=repo, python=python, env=env, emb=str(emb), run=str(run),
                shims=shims(root, python), can_mount=can_mount(root))


def toy_flags(emb: str, out: str) -> list[str]:
    """A toy run of one iteration that takes seconds (the cases' base flags)."""
    return ["--model", "toy", "--device", "cpu", "--data_json_path", f"{emb}/train/index.json",
            "--eval_data_json_path", f"{emb}/eval/index.json", "--output_dir", out, "--sampling_steps", "4",
            "--tree_split_points", "0", "--train_batch_size", "1", "--max_train_steps", "1", "--num_eval_prompts", "1",
            "--eval_samples_per_prompt", "2", "--validation_steps", "0", "--report_to", "none"]


def can_mount(root: Path) -> bool:
    """Whether tmpfs mounts work here (root in a container): the disk-full and read-only cases need them."""
    probe = root / "mount_probe"
    probe.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=False)
    return ok


def main() -> int:
    here = Path(__file__).resolve().parents[2]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(here), help="checkout to audit (default: this one)")
    p.add_argument("--python", default=sys.executable, help="interpreter with the project's dependencies")
    p.add_argument("--only", default="", help="run the cases whose id contains this")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per case")
    p.add_argument("--verbose", action="store_true", help="print every case, not only those that are not clear")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="branchgrpo_audit_"))
    try:
        ctx = prepare(root, str(Path(args.repo).resolve()), args.python)
        cases = [c for c in build_cases(toy_flags) if args.only in c.id]
        counts, slowest = dict.fromkeys(COLUMNS, 0), []
        skipped = 0
        for case in cases:
            if case.needs_mount and not ctx["can_mount"]:
                skipped += 1
                continue
            column, reason, took, tail = run_case(case, ctx, args.timeout)
            counts[column] += 1
            slowest.append((took, case.id))
            if args.verbose or column != "clear":
                print(f"{column:18s} {took:5.1f}s  {case.id}: {reason}" + ("" if column == "clear" else f"  | {tail}"),
                      flush=True)
        tried = sum(counts.values())
        print("\n| tried | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 1))
        print(f"| {tried} | " + " | ".join(str(counts[c]) for c in COLUMNS) + " |")
        if skipped:
            print(f"({skipped} case(s) that need tmpfs mounts were not tried: not root, or mount refused)")
        print("slowest: " + ", ".join(f"{case} {took:.1f}s" for took, case in sorted(slowest)[::-1][:3]))
        return 0 if counts["clear"] == tried else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
