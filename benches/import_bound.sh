#!/usr/bin/env bash
# What PostgreSQL alone does with the rows an imported partner writes, measured the way
# pg-ceiling measures its batched figure (16 clients, 100-row INSERT .. SELECT batches, durable
# commits), with no service, no gRPC and no load generator: the most an import could reach.
# The tables are the service's own (its migrations, in a scratch database dropped at the end).
#
# Usage: benches/import_bound.sh [POSTGRES_URL] [SECONDS]
# Prints rows/s for: the partner row alone; the partner row and its request-id record; the
# partner row, its request-id record and its audit entry (what an import row writes); and, for
# comparison, a leaner layout the service does not use: the partner row carrying its request id
# (one more unique index) with no separate record and no audit entry.
set -euo pipefail
cd "$(dirname "$0")/.."
url=${1:-${PAYOUTS_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}}
secs=${2:-10}
db=payouts_bound_$$
base=${url%/*}
work=$(mktemp -d)
trap 'psql "$url" -qc "drop database if exists $db with (force)" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

fresh() {
  psql "$url" -qc "drop database if exists $db with (force)" >/dev/null
  psql "$url" -qc "create database $db" >/dev/null
  for f in migrations/postgres/*.sql; do psql -q "$base/$db" -f "$f" >/dev/null; done
  psql "$base/$db" -qc "create extension if not exists pgcrypto; create sequence ids" >/dev/null
  psql "$base/$db" -qc "create table partners_with_request (like partners including all,
    request_id text not null unique)" >/dev/null
}

# Ids sort by time (UUIDv7 in the service); registration numbers are as random as pg-ceiling's.
id() { echo "'0192' || lpad(nextval('ids')::text, 32, '0')"; }
partners="INSERT INTO partners (partner_id, business_registration_number, legal_name,
  representative_name, affected_services, bank_code, account_sealed, account_last4, holder_name,
  account_changed_by, account_change_time, contact_email, create_time, update_time, version)
  SELECT $(id), md5(random()::text || g), 'Load Shop', 'Kim Minji', 'KAKAOTALK_CHANNEL', '004',
  encode(gen_random_bytes(48), 'base64'), '0001', 'Kim Minji', '', 0, 'load@example.com', 1, 1, 1
  FROM generate_series(1, 100) g;"
requests="INSERT INTO idempotency (request_id, method, fingerprint, response, create_time)
  SELECT $(id), '/payouts.v1.PartnerService/RegisterPartner', md5(g::text),
  gen_random_bytes(200), 1 FROM generate_series(1, 100) g;"
audit="INSERT INTO audit_events (audit_event_id, time, principal, method, resource_id, request_id,
  outcome_code, peer_address)
  SELECT $(id), 1, 'local-dev', '/payouts.v1.PartnerService/ImportPartners', $(id), $(id), 'OK',
  '127.0.0.1:50000' FROM generate_series(1, 100) g;"

echo "$partners" >"$work/partner.sql"
echo "${partners/INSERT INTO partners (/INSERT INTO partners_with_request (request_id, }" |
  sed "s/SELECT '0192'/SELECT '0193' || lpad(nextval('ids')::text, 32, '0'), '0192'/" \
  >"$work/partner_with_request_id.sql"
printf 'BEGIN;\n%s\n%s\nCOMMIT;\n' "$partners" "$requests" >"$work/partner_request.sql"
printf 'BEGIN;\n%s\n%s\n%s\nCOMMIT;\n' "$partners" "$requests" "$audit" >"$work/partner_request_audit.sql"

for case in partner partner_request partner_request_audit partner_with_request_id; do
  fresh
  tps=$(pgbench -n -f "$work/$case.sql" -c 16 -j 2 -T "$secs" "$base/$db" 2>/dev/null | awk '/^tps/ {print $3}')
  awk -v c="$case" -v t="$tps" 'BEGIN { printf "%s_rows_per_s@16x100=%.0f\n", c, t * 100 }'
done
