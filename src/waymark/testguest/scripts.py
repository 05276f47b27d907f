"""The programs the test guest runs, kept as Python strings so the wheel always carries them.

They are busybox ``sh`` scripts. The builder writes them into the initramfs, and their text is
part of the build's cache key, so editing one here rebuilds the guest.

What the guest does, and which lines tests rely on (on the first serial port, ``ttyS0``):

* ``READY <boot-id>`` once the data disk is mounted and the agent is running;
* ``COUNTER <n>`` about five times a second, ``n`` kept only in memory (a restored memory
  checkpoint continues at saved + 1, a fresh boot starts at 1);
* ``LINE <n>`` appended to ``/data/log.txt`` about once a second, each followed by ``sync``
  (the numbering continues from the file's last line, so a restored disk continues its own);
* ``SHUTDOWN <action>`` when the agent's ``guest-shutdown`` or the ACPI power button stops it;
* ``TYPED <line>`` for each line typed on the screen's console (``tty1``: the VGA text screen a
  graphical console shows, which says ``WAYMARK SCREEN <boot-id>`` and echoes what it read);
* ``CTRL-ALT-DEL`` when Ctrl+Alt+Del is pressed on the screen's keyboard (the kernel signals
  PID 1, ``kernel.ctrl-alt-del`` being 0, and PID 1 only says so: no reboot).

``waymark.agent=off`` on the kernel command line boots it without its guest agent (the
fallbacks of production checkpoints are tested that way).

However it was booted (``-kernel``, the boot disk's GRUB, the ISO's GRUB; SeaBIOS or OVMF), the
init mounts the ext4 file system labelled ``waymark-data`` on ``/data`` (``/dev/vda`` itself, a
partition of it, else any disk); booted by UEFI it mounts efivarfs on
``/sys/firmware/efi/efivars``; with a TPM 2.0 (an ACPI ``TPM2`` table) it waits for
``/dev/tpmrm0`` before ``READY``, and ``TPM2TOOLS_TCTI`` names it for ``tpm2-tools``. Without
UEFI or a TPM it boots as it always did, with no extra wait.
"""

from __future__ import annotations

# PID 1. It loads the modules listed in /etc/modules (written by the builder in dependency
# order), because there is no udev or modprobe in the guest.
INIT = r"""#!/bin/sh
# PID 1 of the Waymark test guest.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
# tpm2-tools (and programs the agent runs) find the TPM here.
export TPM2TOOLS_TCTI=device:/dev/tpmrm0
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
# The workload's lines go to the first serial port whatever console= says.
if [ -c /dev/ttyS0 ]; then exec </dev/null >/dev/ttyS0 2>&1; fi
# Kernel messages would split the COUNTER lines that tests parse.
echo 1 >/proc/sys/kernel/printk

# wait_for TRIES COMMAND...: run COMMAND every 0.1 s until it succeeds, at most TRIES times.
wait_for() {
    tries=$1
    shift
    until "$@"; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        sleep 0.1
    done
}

# load_modules LIST: the modules named in LIST (a file the builder wrote in dependency order).
load_modules() {
    for module in $(cat "$1"); do
        insmod "/lib/modules/$module.ko" || echo "WARNING: could not load $module"
    done
}

# Booted by UEFI (the kernel then has /sys/firmware/efi): its variables in efivarfs.
mount_efivars() {
    [ -d /sys/firmware/efi ] || return 0
    load_modules /etc/modules.efi
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars \
        || echo "WARNING: could not mount efivarfs"
}

# A TPM 2.0 (the firmware's ACPI TPM2 table): tpm2-tools talk to it through the kernel's
# resource manager. The TPM drivers are built into the kernel.
wait_tpm() {
    [ -e /sys/firmware/acpi/tables/TPM2 ] || return 0
    wait_for 50 test -c /dev/tpmrm0 || echo "WARNING: a TPM2 table but no /dev/tpmrm0"
}

# No udev: name the virtio serial ports the way udev would.
link_ports() {
    mkdir -p /dev/virtio-ports
    for port in /sys/class/virtio-ports/*; do
        [ -r "$port/name" ] || continue
        name=$(cat "$port/name")
        [ -n "$name" ] && ln -sfn "../${port##*/}" "/dev/virtio-ports/$name"
    done
    [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]
}

start_agent() {
    if grep -qw waymark.agent=off /proc/cmdline; then
        echo "NOTE: waymark.agent=off on the kernel command line; the guest agent is not started"
        return
    fi
    if ! ls /sys/class/virtio-ports/vport* >/dev/null 2>&1 || ! wait_for 50 link_ports; then
        echo "NOTE: no org.qemu.guest_agent.0 port; the guest agent is not started"
        return
    fi
    mkdir -p /run/qga-state
    # Restarted if it ever exits, so a test never loses the agent for good.
    (
        while :; do
            qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
                -t /run/qga-state -f /run/qemu-ga.pid -l /run/qemu-ga.log
            sleep 1
        done
    ) &
}

# The data file system is labelled waymark-data: the whole /dev/vda (booted with -kernel, or
# from the ISO), a partition of it (the boot disk), else any disk; an unlabelled /dev/vda as
# before.
# (busybox has no blkid: the ext4 superblock's volume name is 1144 bytes into the device.)
data_device() {
    for device in /dev/vda /dev/vda[0-9]*; do
        if [ -b "$device" ] && \
            [ "$(dd if="$device" bs=1 skip=1144 count=12 2>/dev/null)" = waymark-data ]; then
            echo "$device"
            return
        fi
    done
    findfs LABEL=waymark-data 2>/dev/null || echo /dev/vda
}

mount_data() {
    if ! wait_for 20 test -b /dev/vda; then
        echo "NOTE: no /dev/vda; LINE records stay in memory"
        return
    fi
    device=$(data_device)
    if ! mount -t ext4 "$device" /data; then
        echo "WARNING: $device is not an ext4 file system; LINE records stay in memory"
    fi
}

# busybox acpid reads the power button's input device and runs /etc/acpi/PWRF/00000080.
start_acpid() {
    if wait_for 20 test -c /dev/input/event0; then
        acpid -l /run/acpid.log
    else
        echo "WARNING: no input device for the ACPI power button"
    fi
}

# The screen (tty1: VGA text, or the UEFI frame buffer): a banner, then each line typed there
# goes to the serial port, so a test proves that the graphical console's keys reached the guest.
start_screen() {
    [ -c /dev/tty1 ] || return 0
    (
        exec </dev/tty1 >/dev/tty1 2>&1
        printf '\033[2J\033[H'
        echo "WAYMARK SCREEN $(cat /proc/sys/kernel/random/boot_id)"
        echo "Type a line and press Enter:"
        while read -r typed; do
            echo "TYPED $typed" >/dev/ttyS0
            echo "read: $typed"
        done
    ) &
}

last_line() {
    last=$(tail -n 1 /data/log.txt 2>/dev/null)
    last=${last#LINE }
    case "$last" in
        '' | *[!0-9]*) echo 0 ;;
        *) echo "$last" ;;
    esac
}

workload() {
    trap 'exit 0' TERM
    counter=0
    line=$(last_line)
    # A crash can leave a last line without its newline: end it before appending.
    if [ -s /data/log.txt ] && [ -n "$(tail -c 1 /data/log.txt)" ]; then
        echo >>/data/log.txt
    fi
    while :; do
        counter=$((counter + 1))
        echo "COUNTER $counter"
        if [ $((counter % 5)) -eq 0 ]; then
            line=$((line + 1))
            echo "LINE $line" >>/data/log.txt
            sync
        fi
        sleep 0.2
    done
}

load_modules /etc/modules
mount_efivars
mount_data
wait_tpm
start_agent
start_acpid
start_screen
echo "READY $(cat /proc/sys/kernel/random/boot_id)"
workload &
echo $! >/run/workload.pid
# Ctrl+Alt+Del on the keyboard: the kernel sends PID 1 SIGINT instead of rebooting at once.
trap 'echo "CTRL-ALT-DEL"' INT
echo 0 >/proc/sys/kernel/ctrl-alt-del
# PID 1 must never exit (the kernel panics) and reaps orphans.
while :; do
    wait
    sleep 1
done
"""

# qemu-ga's guest-shutdown runs "/sbin/shutdown -P|-H|-r +0 MESSAGE"; busybox has no shutdown.
SHUTDOWN = r"""#!/bin/sh
# Stop the workload, leave the data disk clean, then power off (or halt, or reboot).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
action=poweroff
for arg in "$@"; do
    case "$arg" in
        -r) action=reboot ;;
        -H) action=halt ;;
    esac
done
if [ -c /dev/ttyS0 ]; then exec >/dev/ttyS0 2>&1; fi
echo "SHUTDOWN $action"
# A frozen file system (guest-fsfreeze-freeze) would block the workload and sync forever.
fsfreeze --unfreeze /data 2>/dev/null
if [ -f /run/workload.pid ]; then
    pid=$(cat /run/workload.pid)
    kill "$pid" 2>/dev/null
    tries=50
    while kill -0 "$pid" 2>/dev/null && [ "$tries" -gt 0 ]; do
        tries=$((tries - 1))
        sleep 0.1
    done
fi
sync
umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
sync
exec busybox "$action" -f
"""

# busybox's poweroff/reboot/halt signal PID 1, which a shell init ignores: route them here.
POWEROFF = "#!/bin/sh\nexec /sbin/shutdown -P\n"
REBOOT = "#!/bin/sh\nexec /sbin/shutdown -r\n"
HALT = "#!/bin/sh\nexec /sbin/shutdown -H\n"

# What busybox acpid runs for the power button (event PWRF, parameter 00000080).
POWER_BUTTON = "#!/bin/sh\nexec /sbin/shutdown -P\n"

# Path in the initramfs -> executable script text.
SCRIPTS: dict[str, str] = {
    "init": INIT,
    "sbin/shutdown": SHUTDOWN,
    "sbin/poweroff": POWEROFF,
    "sbin/reboot": REBOOT,
    "sbin/halt": HALT,
    "etc/acpi/PWRF/00000080": POWER_BUTTON,
}

# The data disk's initial content.
DATA_README = """Data disk of the Waymark test guest.
The guest appends "LINE <n>" to log.txt about once a second, each followed by sync.
"""

# GRUB's configuration, on the boot disk's EFI system partition and on the ISO (their GRUBs
# find it in /boot/grub): boot at once, GRUB's own output on the serial port too. @APPEND@ is
# the kernel command line.
GRUB_CFG = """serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry "Waymark test guest" {
    echo "GRUB: booting the Waymark test guest"
    linux /boot/vmlinuz @APPEND@
    initrd /boot/initrd.img
}
"""
