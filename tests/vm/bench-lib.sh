# shellcheck shell=bash
# tests/vm/bench-lib.sh — what the host sides of the VM benchmarks share.
# Sourced (after `cd` to the repository, with log/die defined), not run.

# bench_build: the release binary the guest runs (BENCH_BUILD=0: as it is).
# Builds take the machine-wide build lock (never two cargo builds at once).
bench_build() {
    if [[ ${BENCH_BUILD:-1} == 1 ]]; then
        flock /tmp/ublk-cargo.lock cargo build --release -p ublk-cache >&2 || die "cargo build failed"
    fi
    [[ -x target/release/ublk-cache ]] || die "no target/release/ublk-cache (build it, or leave BENCH_BUILD unset)"
}

# bench_workdir DIR [GIVEN]: sets WORKDIR to GIVEN, or to a new
# DIR/<time>-<pid> (the last ten such runs are kept); its disk images are
# removed on exit, logs and results stay.
bench_workdir() {
    local dir=$1 given=${2:-}
    if [[ -n $given ]]; then
        WORKDIR=$given
    else
        mkdir -p "$dir"
        find "$dir" -mindepth 1 -maxdepth 1 -type d | sort | head -n -9 | xargs -r rm -rf --
        WORKDIR="$dir/$(date +%Y%m%d-%H%M%S)-$$"
    fi
    mkdir -p "$WORKDIR"
    WORKDIR=$(realpath "$WORKDIR")
    # shellcheck disable=SC2064  # expand now: WORKDIR is fixed from here on
    trap "rm -f '$WORKDIR'/*.img" EXIT
}
