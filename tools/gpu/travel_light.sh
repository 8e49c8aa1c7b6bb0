#!/usr/bin/env bash
# Keep world v1's weights out of what a device call carries, and bring them back after.
#
#   bash tools/gpu/travel_light.sh on     # before the call: v1's weights stay here, untracked and ignored
#   ...the device call (bash tools/gpu/train_world_v2.sh, carry .whl)...
#   bash tools/gpu/travel_light.sh off    # after it: tracked again, exactly as committed
#
# A device call carries the tracked and the untracked-not-ignored files, at most 64 MiB with the wheels.
# While world v1 (the shipped model) and world v2's training state (training/world-v2) are both in the tree,
# that is more than 64 MiB; the GPU job needs only world v2's. Nothing is moved or deleted: `on` drops v1's
# weights from the index and ignores them, `off` restores the index and the ignore list.
set -euo pipefail
cd "$(dirname "$0")/../.."
V1=src/cones_world/weights
EXCLUDE=.git/info/exclude
case "${1:-}" in
  on)
    git rm -r -q --cached "$V1"
    grep -qx "/$V1/" "$EXCLUDE" 2>/dev/null || echo "/$V1/" >> "$EXCLUDE"
    ;;
  off)
    git reset -q HEAD -- "$V1"
    [ -f "$EXCLUDE" ] && sed -i "\#^/$V1/\$#d" "$EXCLUDE"
    ;;
  *)
    echo "usage: bash tools/gpu/travel_light.sh on|off" >&2
    exit 2
    ;;
esac
travelling=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- | tail -1 | cut -f1)
echo "what a device call carries now (before carried paths): $((travelling / 1048576)) MiB"
