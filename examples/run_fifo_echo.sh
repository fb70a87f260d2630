#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Smoke test for the FIFO echo example: one fifo_echo_server and many fifo_echo_client
# processes at once (64 by default, all connected at the same time), each client verifying
# every reply. Exits 0 only if every client verified all its replies, the server served
# them all at once and exited cleanly, and nothing was left in the file system.
#
# Usage: run_fifo_echo.sh SERVER_BINARY CLIENT_BINARY [CLIENTS [REQUESTS]]
set -euo pipefail

if (($# < 2)); then
    echo "usage: $0 SERVER_BINARY CLIENT_BINARY [CLIENTS [REQUESTS]]" >&2
    exit 2
fi
server=$1
client=$2
clients=${3:-64}
requests=${4:-200}

dir=$(mktemp -d "${TMPDIR:-/tmp}/ipcoro-fifo-echo.XXXXXX")
server_pid=
client_pids=()
cleanup() {
    local pid
    for pid in "${client_pids[@]}" $server_pid; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

fail() {
    echo "run_fifo_echo: FAILED: $*" >&2
    exit 1
}

well_known=$dir/echo.fifo
server_log=$dir/server.log

# The server's first line says it is listening: read it through a pipe, no sleeping.
coproc server_proc { exec timeout -k 5 110 "$server" "$well_known" --clients "$clients" 2>&1; }
server_pid=$server_proc_PID
exec {server_out}<&"${server_proc[0]}"
if ! read -r -t 30 -u "$server_out" first_line; then
    fail "the server did not start within 30 s"
fi
echo "$first_line"
[[ $first_line == "fifo_echo_server: listening on $well_known" ]] || fail "unexpected first line from the server"
# The rest of the server's output goes to a log while the clients run.
cat <&"$server_out" >"$server_log" &
log_pid=$!
exec {server_out}<&-

for ((i = 0; i < clients; i++)); do
    timeout -k 5 100 "$client" "$well_known" --requests "$requests" --reply-dir "$dir" >"$dir/client-$i.log" 2>&1 &
    client_pids+=($!)
done

failed_clients=0
for i in "${!client_pids[@]}"; do
    if ! wait "${client_pids[$i]}"; then
        failed_clients=$((failed_clients + 1))
        sed "s/^/  client $i: /" "$dir/client-$i.log" >&2
    fi
done
verified=$(cat "$dir"/client-*.log | grep -c "$requests replies verified" || true)
client_pids=()

server_status=0
wait "$server_pid" || server_status=$?
server_pid=
wait "$log_pid" || true
cat "$server_log"

((failed_clients == 0)) || fail "$failed_clients of $clients clients failed"
((verified == clients)) || fail "only $verified of $clients clients verified all $requests replies"
((server_status == 0)) || fail "the server exited with status $server_status"
peak=$(sed -n 's/.*at most \([0-9]*\) connected at once.*/\1/p' "$server_log")
[[ -n $peak ]] || fail "the server did not report how many clients it served at once"
# --clients makes the server wait for all of them before serving, so all are connected at once.
((peak == clients)) || fail "only $peak of $clients clients were connected at once"

# Everything the programs created is gone: only this script's logs remain.
leftovers=$(find "$dir" -mindepth 1 ! -name '*.log' -print)
[[ -z $leftovers ]] || fail "left behind in the file system: $leftovers"

echo "run_fifo_echo: OK: $clients clients at once (peak $peak), $((clients * requests)) requests, every reply verified"
