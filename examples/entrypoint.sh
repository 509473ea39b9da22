#!/usr/bin/env bash
# Container entrypoint step: mount the model cache, then run the inference server
# reading /data-fast. The mount is taken down when the server exits.
#
#   docker run --device /dev/fuse --cap-add SYS_ADMIN \
#       -v /mnt/oss-models:/data-slow:ro -e CACHE_CAPACITY=20G image ./entrypoint.sh serve ...
set -euo pipefail
SOURCE=${SOURCE:-/data-slow}
MOUNTPOINT=${MOUNTPOINT:-/data-fast}
mkdir -p "$MOUNTPOINT"
# Returns once the mount is ready; the daemon runs in the background.
memcachefs mount "$SOURCE" "$MOUNTPOINT" --capacity "${CACHE_CAPACITY:-20G}" \
    --log-file /var/log/memcachefs.log
trap 'memcachefs umount "$MOUNTPOINT"' EXIT
"$@"
