#!/usr/bin/env bash
# Builds the fastest braid-sim: the `sim` profile (release, with panics that abort), optimised
# with a profile of the simulator's own runs (profile-guided optimisation). Three steps:
#
#   1. build an instrumented simulator, which counts how often each branch and call is taken;
#   2. run it over the shipped scenarios (all but the benchmark, `bench-5-regions`, so that the
#      benchmark measures a workload the build was not trained on);
#   3. build again, with the counts: hot code laid out together, cold code moved away.
#
# The simulator is bound by its instruction cache (docs/benchmarks.md): the layout is what
# pays. Usage: bash sim/build-pgo.sh [--quiet]; prints the binary's path last. It needs
# llvm-profdata, which the rustup component llvm-tools has (added here if missing), and takes
# two release builds of the simulator (a few minutes on two cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

quiet=false
[ "${1:-}" = "--quiet" ] && quiet=true
say() { $quiet || echo "build-pgo: $*" >&2; }

host="$(rustc -vV | sed -n 's/^host: //p')"
sysroot="$(rustc --print sysroot)"
profdata="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
    say "adding the rustup component llvm-tools (for llvm-profdata)"
    rustup component add llvm-tools >/dev/null
fi
[ -x "$profdata" ] || { echo "build-pgo: no llvm-profdata at $profdata" >&2; exit 1; }

# Absolute, so that the path printed last works from anywhere (a relative CARGO_TARGET_DIR is
# taken from the repository's root, as cargo takes it here).
out="${CARGO_TARGET_DIR:-target}/pgo"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
data="$out/profiles"
rm -rf "$data"
mkdir -p "$data"

# The flags of .cargo/config.toml's [build] rustflags, which these replace, and the profiling
# flag: passed encoded (one flag per field), which cargo takes before any RUSTFLAGS, and which
# keeps a path with spaces one flag. An explicit --target keeps the flags off build scripts and
# procedural macros.
build() {
    local dir="$1" flag="$2"
    CARGO_ENCODED_RUSTFLAGS="--cfg"$'\x1f'"tokio_unstable"$'\x1f'"$flag" \
        cargo build --locked --profile sim -p braid-sim --target "$host" \
        --target-dir "$out/$dir" $($quiet && echo --quiet)
}

say "1/3 building the instrumented simulator"
build gen "-Cprofile-generate=$data"
instrumented="$out/gen/$host/sim/braid-sim"

say "2/3 running the shipped scenarios but the benchmark"
for scenario in docs/scenarios/*.toml; do
    case "$(basename "$scenario")" in bench-*) continue ;; esac
    say "    $scenario"
    # The sweep's report and progress go to a log, shown only if a seed fails.
    if ! LLVM_PROFILE_FILE="$data/%m-%p.profraw" "$instrumented" run "$scenario" --seeds 0..4 \
        >"$out/training.log" 2>&1; then
        cat "$out/training.log" >&2
        echo "build-pgo: $scenario failed in the instrumented build" >&2
        exit 1
    fi
done
"$profdata" merge -o "$data/merged.profdata" "$data"

say "3/3 building with the profile"
build use "-Cprofile-use=$data/merged.profdata"
binary="$out/use/$host/sim/braid-sim"
say "done: $binary"
echo "$binary"
