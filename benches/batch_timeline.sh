#!/usr/bin/env bash
# The group-commit batches as PostgreSQL sees them: how long each batch's statement executed,
# and how long the database waited from the end of one to the start of the next. These move
# far less with the machine's speed than calls per second do, so they show a change to the
# service's turnaround when timings drift.
#
# It runs the load generator (`cargo bench --bench load -- SCENARIO ARGS --database-url ..`)
# on a scratch database that logs every statement with its duration
# (`log_min_duration_statement = 0`, set on that database alone, parameters left out), then
# reads those lines from the server's log and drops the database.
#
# Usage: benches/batch_timeline.sh SERVER_LOG SCENARIO [ARGS...]
#   e.g. benches/batch_timeline.sh "$SERVER_LOG" claims --count 20000 --pause-payouts
# SERVER_LOG is the file the PostgreSQL server logs to. Its log_line_prefix must begin with
# '%m [%p] ' and end with '@%d ' (as '%m [%p] %q%u@%d ' does). The server is
# PAYOUTS_TEST_POSTGRES_URL's (default postgres://postgres@127.0.0.1:5432/postgres).
# Prints, for the statement that took the database's time most (a batch's): how many ran,
# their execution and the gaps between them (mean and median, ms; the log's clock counts
# whole milliseconds, so take the means), and the share of the run they executed.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$1
shift
url=${PAYOUTS_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db=payouts_timeline_$$
trap 'psql "$url" -qc "drop database if exists $db with (force)" >/dev/null 2>&1 || true' EXIT
psql "$url" -qc "create database $db" >/dev/null
psql "$url" -qc "alter database $db set log_min_duration_statement = 0" >/dev/null
psql "$url" -qc "alter database $db set log_parameter_max_length = 0" >/dev/null
start=$(wc -l <"$log")
cargo bench --bench load -- "$@" --database-url "${url%/*}/$db"
tail -n +"$((start + 1))" "$log" | python3 -c '
import re, statistics, sys
from datetime import datetime

db = sys.argv[1]
line = re.compile(
    r"^(\S+ \S+) \S+ \[\d+\] \S*@" + re.escape(db)
    + r" LOG:  duration: ([\d.]+) ms  execute [^:]*: (.{0,60})")
runs = {}
for text in sys.stdin:
    m = line.match(text)
    if m:
        end = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp() * 1000
        took = float(m.group(2))
        runs.setdefault(m.group(3), []).append((end - took, took))
if not runs:
    sys.exit("no statement of " + db + " in the log: is it the server log, with its prefix?")
head, batches = max(runs.items(), key=lambda kv: sum(t for _, t in kv[1]))
batches.sort()
took = [t for _, t in batches]
gaps = [b[0] - (a[0] + a[1]) for a, b in zip(batches, batches[1:])]
run = batches[-1][0] + batches[-1][1] - batches[0][0]
def ms(v):
    return "mean %.2f median %.2f" % (statistics.mean(v), statistics.median(v)) if v else "-"
print("batch statement: " + head + "...")
print("statements=%d executing_ms: %s gap_ms: %s executing_share=%.2f"
      % (len(batches), ms(took), ms(gaps), sum(took) / run if run else 0))
' "$db"
