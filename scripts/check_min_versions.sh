#!/usr/bin/env bash
# Check that the lower bounds declared in requirements.txt really work: install the lowest claimed versions
# (requirements-min.txt, `==` pins) into a scratch virtual environment OUTSIDE the repository, install branchgrpo
# into it without dependencies, and run the test suite (or the pytest selection given as arguments) offline.
# Run on demand when a bound changes; NOT part of CI (a fresh environment: about 6 GB, 3 to 5 minutes to install).
# Exit status = pytest's (or pip's, when the pinned set cannot be installed).
#
#   bash scripts/check_min_versions.sh                                   the whole suite on the minimum set
#   bash scripts/check_min_versions.sh -m "not slow"                     a pytest selection (arguments go to pytest)
#   PIN="transformers==5.3.0 peft==0.18.0" bash scripts/check_min_versions.sh tests/test_video_rewards.py
#                                        override single pins of the file (bisecting one package while the
#                                        others stay where they are; PIN="transformers" = its newest release)
#   MIN_REQS=FILE   the pins to install (default: requirements-min.txt at the repository root)
#   VENV=DIR        the scratch environment (default: ${TMPDIR:-/tmp}/branchgrpo-minver-venv)
#   REUSE=1         reuse VENV if it exists (pip then swaps only what differs; quick for bisection) and keep it;
#                   by default VENV is created afresh and removed at the end (KEEP=1 keeps it)
#   PYTHON=python3.11                    the interpreter that creates VENV
#
# torch/torchvision: pip on this project's CPU machines takes them from local disk (torch 2.14.1 + torchvision
# 0.29.1); elsewhere pip downloads the pinned build. HF_HUB_OFFLINE etc. are set: nothing is fetched by the tests.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MIN_REQS="${MIN_REQS:-$REPO/requirements-min.txt}"
VENV="${VENV:-${TMPDIR:-/tmp}/branchgrpo-minver-venv}"
source "$REPO/scripts/lib/common.sh"
bg_bool REUSE 0
bg_bool KEEP "$REUSE"
[[ -f "$MIN_REQS" ]] || { echo "[check_min_versions] no $MIN_REQS" >&2; exit 2; }
case "$(cd "$(dirname "$VENV")" 2>/dev/null && pwd)/" in
  "$REPO"/*) echo "[check_min_versions] VENV must be outside the repository ($VENV)" >&2; exit 2 ;;
esac

start=$(date +%s)
if [[ "$REUSE" != 1 || ! -x "$VENV/bin/python" ]]; then
  rm -rf "$VENV"
  echo "[check_min_versions] creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
cleanup() { [[ "$KEEP" == 1 ]] || rm -rf "$VENV"; }
trap cleanup EXIT

# The pins, with PIN's entries replacing the file's line for the same package (names compared normalised).
reqs="$VENV/requirements-check.txt"
"$VENV/bin/python" - "$MIN_REQS" "${PIN:-}" > "$reqs" <<'PY'
import re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9._-]+)", s).group(1)).lower()
overrides = {norm(p): p for p in sys.argv[2].split()}
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        print(overrides.pop(norm(line), line))
print("\n".join(overrides.values()))
PY
echo "[check_min_versions] installing: $(grep -v '^$' "$reqs" | tr '\n' ' ')"
"$VENV/bin/python" -m pip install --quiet -r "$reqs"
if [[ "$REUSE" == 1 ]]; then
  # A reused environment must hold what a fresh one would: remove what no pinned package (transitively) requires
  # any more, e.g. a dependency that only a newer release of a swapped package pulled in.
  orphans="$("$VENV/bin/python" - "$reqs" <<'PY'
import re, sys
from importlib.metadata import distributions
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
dists = {norm(d.metadata["Name"]): d for d in distributions()}
todo = [Requirement(line.strip()) for line in open(sys.argv[1]) if line.strip()]
seen = set()
while todo:  # the pinned packages' dependency closure (markers evaluated, requested extras followed)
    req = todo.pop()
    name = norm(req.name)
    if name in seen or name not in dists:
        continue
    seen.add(name)
    for spec in dists[name].requires or []:
        dep = Requirement(spec)
        if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
            todo.append(dep)
keep = {"pip", "setuptools", "wheel", "branchgrpo"}
print(" ".join(sorted(n for n in dists if n not in seen and n not in keep)))
PY
)"
  if [[ -n "$orphans" ]]; then
    echo "[check_min_versions] removing what nothing pinned requires any more: $orphans"
    "$VENV/bin/python" -m pip uninstall --quiet --yes $orphans
  fi
fi
"$VENV/bin/python" -m pip install --quiet --no-deps -e "$REPO" > "$VENV/install-branchgrpo.log" 2>&1 \
  || { cat "$VENV/install-branchgrpo.log"; exit 1; }
"$VENV/bin/python" -m pip check || echo "[check_min_versions] warning: pip check reports conflicts (above)"
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
names = ["torch", "torchvision", "diffusers", "transformers", "accelerate", "open_clip_torch", "numpy", "tqdm", "peft",
         "safetensors", "huggingface-hub", "tokenizers", "timm", "sentencepiece", "protobuf", "scikit-learn", "scipy",
         "pyyaml", "tensorboard", "matplotlib", "pillow", "imageio", "imageio-ffmpeg", "pytest", "pytest-timeout"]
found = []
for n in names:
    try:
        found.append(f"{n} {version(n)}")
    except Exception:
        found.append(f"{n} -")
print("[check_min_versions] versions: " + ", ".join(found))
PY
echo "[check_min_versions] setup took $(( $(date +%s) - start )) s"

# As if activated: the launchers the tests start find the scratch environment's python3 and torchrun on PATH.
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
cd "$REPO"
set +e
"$VENV/bin/python" -m pytest "$@"
status=$?
set -e
echo "[check_min_versions] pytest exit status $status after $(( $(date +%s) - start )) s in all"
exit $status
