#!/usr/bin/env bash
# Container entrypoint: mount the model cache, wait until it is ready, then exec the
# model server, which reads $MOUNTPOINT. Options come from MEMCACHEFS_* variables
# (MEMCACHEFS_CAPACITY is required; see memcachefs mount --help).
#
#   docker run --device /dev/fuse --cap-add SYS_ADMIN -v /mnt/oss-models:/data-slow:ro \
#       -e MEMCACHEFS_CAPACITY=20G -e MEMCACHEFS_HTTP_ADDRESS=127.0.0.1:9100 \
#       image python -m my_model_server --models /data-fast
set -euo pipefail
SOURCE=${SOURCE:-/data-slow}
MOUNTPOINT=${MOUNTPOINT:-/data-fast}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-600}
if [ "$#" -eq 0 ]; then
    echo "entrypoint.sh: give the model server's command line" >&2
    exit 2
fi
mkdir -p "$MOUNTPOINT"
# Returns once the mount serves; the daemon runs in the background and logs to a file.
memcachefs mount "$SOURCE" "$MOUNTPOINT" \
    --log-file "${MEMCACHEFS_LOG_FILE:-/tmp/memcachefs.log}"
# With the HTTP listener on, also wait for /ready (every warm file resident).
if [ -n "${MEMCACHEFS_HTTP_ADDRESS:-}" ]; then
    port=${MEMCACHEFS_HTTP_ADDRESS##*:}
    python3 - "$port" "$READY_TIMEOUT_S" <<'PY'
import sys, time, urllib.request
port, timeout_s = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + timeout_s
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as reply:
            if reply.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"entrypoint.sh: the cache was not ready after {timeout_s:.0f}s")
    time.sleep(0.5)
PY
fi
exec "$@"
