#!/usr/bin/env bash
# Builds every fuzz target once and runs each for SECONDS_PER_TARGET seconds (default 30),
# one after the other. Prints one summary line per target; exits non-zero if any target
# crashed (or, in CI, if cargo-fuzz cannot be installed or a target cannot be built).
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET]
#
# Seeds live in fuzz/seeds/<target>/ (committed); what the fuzzer finds grows in
# fuzz/target/corpus/<target>/ (ignored), crashes land in fuzz/artifacts/<target>/.
# Uses libFuzzer without a sanitizer (`-s none`), so it works on the stable toolchain.
set -uo pipefail

secs="${1:-30}"
case "$secs" in
    ''|*[!0-9]*) echo "usage: bash fuzz/run.sh [SECONDS_PER_TARGET]" >&2; exit 2 ;;
esac
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root" || exit 1
# cargo fuzz keeps its own target dir under fuzz/; a CARGO_TARGET_DIR meant for the main
# crate would send the instrumented build elsewhere.
unset CARGO_TARGET_DIR

targets=(line_protocol dns http_head wal config)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz" >&2
    if ! cargo install cargo-fuzz --locked; then
        if [[ -z "${CI:-}" ]]; then
            echo "run.sh: SKIPPED: cargo-fuzz is not installed and could not be installed" >&2
            exit 0
        fi
        echo "run.sh: cargo-fuzz could not be installed" >&2
        exit 1
    fi
fi

echo "run.sh: building ${#targets[@]} targets" >&2
if ! cargo fuzz build -s none; then
    echo "run.sh: the fuzz targets do not build" >&2
    exit 1
fi

logs="$here/target/logs"
mkdir -p "$logs"
failed=0
summary=()
for t in "${targets[@]}"; do
    corpus="$here/target/corpus/$t"
    artifacts="$here/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    before=$(find "$artifacts" -type f | wc -l)
    extra=()
    # The registry's line limit is 8 KiB: longer inputs reach its TooLong path.
    [[ "$t" == line_protocol ]] && extra+=(-max_len=20000)
    echo "run.sh: $t for ${secs}s" >&2
    cargo fuzz run -s none "$t" "$corpus" "$here/seeds/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 "${extra[@]}" \
        >"$logs/$t.log" 2>&1
    rc=$?
    crashes=$(( $(find "$artifacts" -type f | wc -l) - before ))
    execs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$logs/$t.log" | grep -oE '[0-9]+$' | tail -1)
    rate=$(grep -oE '^stat::average_exec_per_sec: *[0-9]+' "$logs/$t.log" | grep -oE '[0-9]+$' | tail -1)
    took=$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$logs/$t.log" | grep -oE 'in [0-9]+' | grep -oE '[0-9]+' | tail -1)
    units=$(find "$corpus" -type f | wc -l)
    if [[ $rc -ne 0 || $crashes -gt 0 ]]; then
        failed=1
        [[ $crashes -eq 0 ]] && crashes="? (exit $rc)"
        tail -n 40 "$logs/$t.log" >&2
    fi
    summary+=("$(printf '%-14s executions=%s seconds=%s exec/s=%s corpus=%s crashes=%s' \
        "$t" "${execs:-?}" "${took:-$secs}" "${rate:-?}" "$units" "$crashes")")
done

echo
for line in "${summary[@]}"; do echo "fuzz: $line"; done
if [[ $failed -ne 0 ]]; then
    echo "run.sh: a target crashed; see fuzz/artifacts/ and fuzz/target/logs/" >&2
    exit 1
fi
