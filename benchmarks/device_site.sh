# Sourced by the device scripts: the carried wheelhouse (device_wheelhouse.sh) installed into /tmp/site
# once per call, however many scripts of the call source this (FUSERVE_SITE_READY), and put on PYTHONPATH
# beside the tree. WHEELS=DIR: another wheel folder than .whl.
#   . "$(dirname "$0")/device_site.sh" || exit 1
# FUSERVE_COMMIT, the commit that results are labelled with, unless the caller set it: the device's copy
# of .git can be older than the tree it carries (a whole session's runs read fd7401d on 2026-11-28), so a
# tree that differs from that HEAD says so ("<HEAD>+changed").
if [ -z "${FUSERVE_COMMIT:-}" ]; then
  FUSERVE_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  git diff --quiet HEAD -- fuserve benchmarks tests training 2>/dev/null || FUSERVE_COMMIT=$FUSERVE_COMMIT+changed
  export FUSERVE_COMMIT
fi
[ -n "${FUSERVE_SITE_READY:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD FUSERVE_SITE_READY=1
