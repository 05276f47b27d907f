#!/usr/bin/env bash
# The Waymark tour (make demo): a real guest booted, saved, resumed and checkpointed live; then
# two checkpoints, a failed "upgrade", going back, deleting, exporting, a backup and its restore as
# a new VM, and back to running. Real QEMU, qcow2 images and qemu-io; a
# throwaway home folder unless DEMO_HOME is set; the guest is cached in GUEST_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
export WAYMARK_HOME="${DEMO_HOME:-$(mktemp -d /tmp/waymark-demo.XXXXXX)}"
wm() { printf '$ waymark'; printf ' %q' "$@"; echo; .venv/bin/waymark "$@"; echo; }
disk() { .venv/bin/waymark vm show demo --json | .venv/bin/python -c \
  'import json,sys; print(json.load(sys.stdin)["disks"][1]["active_image"])'; }
field() { .venv/bin/python -c "import json,sys; print(json.load(open('$1'))['$2'])"; }
io() {
  echo "  (qemu-io: $1)"
  out=$(qemu-io -f qcow2 -c "$1" "$(disk)")
  echo "  $out" | sed -n 1p
  if grep -qi "fail" <<<"$out"; then echo "demo: unexpected disk content" >&2; exit 1; fi
}

echo "Waymark home: $WAYMARK_HOME"; echo
GUEST_CACHE="${GUEST_CACHE:-/var/tmp/waymark-guest}"
.venv/bin/waymark guest build --dest "$GUEST_CACHE" --json > "$WAYMARK_HOME/guest.json"
# disk 0: the guest's own ext4 data disk (pinned, never written); disk 1: a scratch disk
wm vm create demo --memory 256M --kernel "$(field "$WAYMARK_HOME/guest.json" kernel)" \
  --initrd "$(field "$WAYMARK_HOME/guest.json" initrd)" --append console=ttyS0 \
  --disk "$(field "$WAYMARK_HOME/guest.json" disk)" --disk 64M
wm vm start demo
sleep 5
wm vm status demo
echo "The guest's serial console (last lines):"; tail -n 3 "$(.venv/bin/waymark vm status demo --json \
  | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["serial_log"])')"; echo
wm vm save demo                                  # memory to a file; QEMU exits
wm vm start demo                                 # resumes exactly where it was
wm checkpoint create demo --name "live, with memory" --type standard   # the guest barely pauses
wm checkpoint create demo --name "live, quiesced" --type production    # frozen through the agent
wm checkpoint show demo "live, with memory"
wm vm stop demo                                  # a clean shutdown through the guest agent
io "write -P 0x11 0 4M"                         # the system as it works today
wm checkpoint create demo --name "before upgrade"
io "write -P 0x22 0 4M"                         # the upgrade...
wm checkpoint create demo --name "after upgrade"
io "write -P 0x66 1M 1M"                        # ...and what broke afterwards
wm vm set demo --memory 512M
wm checkpoint list demo
wm checkpoint apply demo "before upgrade" --checkpoint-first
echo "The disk is back as it was before the upgrade:"
io "read -P 0x11 0 4M"
wm vm show demo
wm checkpoint create demo --name "Experiment 1"
wm checkpoint create demo --name "Experiment 2"
wm checkpoint list demo
wm checkpoint delete demo 'Experiment*' --yes   # their disk layers are merged away
wm checkpoint export demo "after upgrade" "$WAYMARK_HOME/export-after-upgrade"
wm vm import "$WAYMARK_HOME/export-after-upgrade" --name demo-clone
wm vm list
wm backup repo init "$WAYMARK_HOME/usb-backups"     # stands for a folder on external storage
wm backup run demo demo-clone --repo "$WAYMARK_HOME/usb-backups"
io "write -P 0x77 2M 256k"                      # Now moves on; a checkpoint does not break tracking
wm checkpoint create demo --name "after the first backup"
wm backup run demo --repo "$WAYMARK_HOME/usb-backups"   # incremental: only what changed
wm backup list --repo "$WAYMARK_HOME/usb-backups"
wm backup verify --repo "$WAYMARK_HOME/usb-backups"
wm backup restore demo --repo "$WAYMARK_HOME/usb-backups" --as-new demo-restored
wm checkpoint apply demo "live, with memory" --discard-current --start  # running where it was
wm vm status demo
wm vm stop demo --force
wm check
echo "Done. Everything lives in $WAYMARK_HOME (catalog.db, vms/<id>/disks, vms/<id>/checkpoints)."
