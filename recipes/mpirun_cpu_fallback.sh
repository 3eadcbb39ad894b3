#!/usr/bin/env bash
# CPU-only cluster fallback: one publisher and several receivers under mpirun, over the mpi transport.
#
#   recipes/mpirun_cpu_fallback.sh            # 1 publisher + 3 receivers on this host
#   NP=9 MPIRUN_ARGS="--hostfile hosts" recipes/mpirun_cpu_fallback.sh
#
# Rank 0 runs `hotweights publish` (synthetic weights), ranks 1..NP-1 run `hotweights receive`
# (the inference-side loop). Every receiver prints a digest of the weights it applied for each
# version; the check at the end compares them with the publisher's and exits non-zero on any
# difference. Knobs: NP, VERSIONS, SIZE_MB, WINDOW (--window), CHUNK_MB (--mpi-chunk-mb),
# PYTHON, MPIRUN, MPIRUN_ARGS (as root, Open MPI also needs OMPI_ALLOW_RUN_AS_ROOT=1 and
# OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 in the environment).
set -euo pipefail

NP=${NP:-4}
VERSIONS=${VERSIONS:-3}
SIZE_MB=${SIZE_MB:-64}
WINDOW=${WINDOW:-4}
CHUNK_MB=${CHUNK_MB:-16}
PYTHON=${PYTHON:-python3}
MPIRUN=${MPIRUN:-mpirun}
MPIRUN_ARGS=${MPIRUN_ARGS:---oversubscribe}
TIMEOUT=${TIMEOUT:-120}

if [ "$NP" -lt 2 ]; then echo "NP must be >= 2 (one publisher, at least one receiver)" >&2; exit 2; fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "mpirun: 1 publisher + $((NP - 1)) receivers, $VERSIONS versions of $SIZE_MB MB, window $WINDOW, chunk $CHUNK_MB MiB"
common=(--endpoint mpi:// --transport mpi --window "$WINDOW" --mpi-chunk-mb "$CHUNK_MB" --timeout "$TIMEOUT" --json)
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of words on purpose
"$MPIRUN" $MPIRUN_ARGS \
    -n 1 "$PYTHON" -m hotweights_trainer publish "${common[@]}" --versions "$VERSIONS" --size-mb "$SIZE_MB" \
        --receivers $((NP - 1)) \
    : -n $((NP - 1)) "$PYTHON" -m hotweights_trainer receive "${common[@]}" --versions "$VERSIONS" \
    | tee "$log"

"$PYTHON" - "$log" "$NP" "$VERSIONS" <<'PY'
import json, sys

path, np_, versions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# Ranks write concurrently, so two JSON objects can share a line: decode every object in the text.
text, rows, pos, dec = open(path).read(), [], 0, json.JSONDecoder()
while (start := text.find("{", pos)) >= 0:
    try:
        obj, pos = dec.raw_decode(text, start)
        rows.append(obj)
    except json.JSONDecodeError:
        pos = start + 1
published = {r["version"]: r for r in rows if r.get("role") == "publisher"}
received = {}
for r in rows:
    if r.get("role") == "receiver" and "digest" in r:
        received.setdefault(r["rank"], {})[r["version"]] = r["digest"]
problems = []
if sorted(published) != list(range(1, versions + 1)):
    problems.append(f"publisher committed versions {sorted(published)}, expected 1..{versions}")
for rank in range(1, np_):
    for v, pub in published.items():
        got = received.get(rank, {}).get(v)
        if got != pub["digest"]:
            problems.append(f"rank {rank} version {v}: digest {got} != publisher's {pub['digest']}")
for v, pub in sorted(published.items()):
    print(f"version {v}: {pub['mb']:.1f} MB to {pub['receivers']} receivers in {pub['seconds'] * 1e3:.1f} ms "
          f"({pub['gbps']:.2f} GB/s)")
if problems:
    print("VERIFICATION FAILED:\n  " + "\n  ".join(problems))
    sys.exit(1)
print(f"verified: {np_ - 1} receivers x {versions} versions bit-exact (digests match the publisher)")
PY
