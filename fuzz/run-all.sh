#!/bin/sh
# Runs every fuzz target in turn for SECONDS each (default 180), starting from its seeds (and,
# for the configuration loader, the example files); what the runs find stays in corpus/ and
# crashes in artifacts/, neither of them kept in the repository.
set -eu
cd "$(dirname "$0")"
seconds=${1:-180}
for target in $(cargo fuzz list); do
    set -- "corpus/$target"
    [ -d "seeds/$target" ] && set -- "$@" "seeds/$target"
    [ "$target" = config_toml ] && set -- "$@" ../examples
    mkdir -p "corpus/$target"
    cargo fuzz run -s none "$target" "$@" -- -max_total_time="$seconds"
done
