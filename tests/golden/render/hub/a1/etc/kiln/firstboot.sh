#!/bin/sh
# Rendered by kiln from hub.toml (cluster lab). Do not edit: change the profile and rebuild.
# A failing command is reported and makes the unit fail; run-once
# commands are still not run again (exactly once, like cloud-init).
set -u
status=0
run() {
  echo "kiln-firstboot: $1: $2"
  /bin/sh -c "$2" || { rc=$?; echo "kiln-firstboot: $1 failed with status $rc: $2"; status=1; }
}
marker=/var/lib/kiln/run-once.done
mkdir -p "$(dirname "$marker")"

# boot-cmd: every boot

# run-once: first boot only
if [ -e "$marker" ]; then
  echo "kiln-firstboot: run-once commands already ran ($(cat "$marker"))"
else
  date -u +%Y-%m-%dT%H:%M:%SZ > "$marker.tmp" && mv "$marker.tmp" "$marker"
fi
exit $status
