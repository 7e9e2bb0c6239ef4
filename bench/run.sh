#!/usr/bin/env bash
# The mglue-vs-mergekit merge benchmark, in one command:
#
#   bench/run.sh            full run: 4 x 0.5B-parameter float16 Llama models, 3 repetitions
#   bench/run.sh --quick    smoke test: the same models cut to 2 layers, 1 repetition
#
# Options: --reps N, --threads N (default 2, for both tools), --methods "linear ties ...",
#          --no-build (use the mglue already in target/release), --markdown FILE.
#
# Steps: builds mglue in release; snapshots the binary and its plugins into bench/zoo/bin/ (so
# a rebuild during a long run cannot change what is measured; plugins load from the
# executable's directory); creates the virtualenv bench/venv with mergekit 0.1.5 from PyPI if
# absent; writes the synthetic zoo into bench/zoo/ if absent (deterministic, bench/gen_zoo.py);
# then bench/bench.py runs every merge with both tools, alternating, plus the I/O floor, and
# writes the table into BENCHMARKS.md (the full run) or bench/zoo/BENCHMARKS-quick.md (--quick).
set -euo pipefail

# The whole script is one function, parsed before it runs: editing this file during a long run
# cannot change what the running shell executes next.
main() {

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
invocation="bench/run.sh${*:+ $*}"

quick=0 reps="" threads=2 methods="" build=1 markdown=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --reps) reps="$2"; shift ;;
        --threads) threads="$2"; shift ;;
        --methods) methods="$2"; shift ;;
        --no-build) build=0 ;;
        --markdown) markdown="$2"; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$quick" = 1 ]; then
    layers=2; reps="${reps:-1}"; zoo="bench/zoo/quick-${layers}L"; markdown="${markdown:-bench/zoo/BENCHMARKS-quick.md}"
else
    layers=8; reps="${reps:-3}"; zoo="bench/zoo/full-${layers}L"; markdown="${markdown:-BENCHMARKS.md}"
fi

step() { printf '\n== %s\n' "$*" >&2; }

# /usr/bin/time is not needed (bench/measure.py reads the kernel's rusage itself), but python3,
# a C toolchain for cargo, and coreutils are.
command -v python3 >/dev/null || { echo "bench/run.sh needs python3 (3.9+)" >&2; exit 1; }

if [ "$build" = 1 ]; then
    step "building mglue (release)"
    cargo build --release --workspace
fi
[ -x target/release/mglue ] || { echo "target/release/mglue is missing: run without --no-build" >&2; exit 1; }
mkdir -p bench/zoo/bin
rm -f bench/zoo/bin/mglue bench/zoo/bin/libmglue_plugin_*.so
cp target/release/mglue target/release/libmglue_plugin_*.so bench/zoo/bin/
# What was built: the commit (and whether the tree had uncommitted changes) and the binaries' hashes.
{
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench' 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "built: $(date -u -r target/release/mglue '+%Y-%m-%d %H:%M UTC')"
    (cd bench/zoo/bin && sha256sum mglue libmglue_plugin_*.so | cut -c1-12,65-)
} > bench/zoo/bin/BUILD_INFO

if [ ! -x bench/venv/bin/mergekit-yaml ]; then
    step "installing mergekit 0.1.5 into bench/venv (PyPI; torch comes as its dependency)"
    rm -rf bench/venv
    python3 -m venv bench/venv
    # PyPI's only Linux x86_64 torch wheel is the CUDA build (it pulls the nvidia-* wheels,
    # ~3 GB); it runs on CPU. No other index is reachable here.
    bench/venv/bin/pip install "mergekit==0.1.5"
fi

if [ ! -f "$zoo/zoo.json" ]; then
    step "writing the synthetic zoo ($layers layers) into $zoo"
    bench/venv/bin/python bench/gen_zoo.py --out "$zoo" --layers "$layers"
fi

step "benchmarking ($reps repetition(s), $threads threads each)"
args=(--zoo "$zoo" --mglue bench/zoo/bin/mglue --python bench/venv/bin/python --reps "$reps" --threads "$threads"
      --markdown "$markdown" --command "$invocation")
# shellcheck disable=SC2206
[ -n "$methods" ] && args+=(--methods $methods)
python3 bench/bench.py "${args[@]}"
echo "results: $markdown" >&2
}

main "$@"
