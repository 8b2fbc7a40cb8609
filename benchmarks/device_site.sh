# Sourced by the device scripts: the carried wheelhouse (device_wheelhouse.sh) installed into /tmp/site
# once per call, however many scripts of the call source this (FUSERVE_SITE_READY), and put on PYTHONPATH
# beside the tree. WHEELS=DIR: another wheel folder than .whl.
#   . "$(dirname "$0")/device_site.sh" || exit 1
[ -n "${FUSERVE_SITE_READY:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD FUSERVE_SITE_READY=1
