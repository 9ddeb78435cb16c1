#!/usr/bin/env bash
# Install the ngcal edge daemon on a Jetson (JetPack 6, Python 3.10) or any Linux box.
#
#   sudo scripts/install-edge.sh --bundle runs/tile/build/bundle [--prefix /opt/ngcal]
#   scripts/install-edge.sh --dry-run ...     # print every step, change nothing
#
# torch is never installed: the edge extra scores with onnxruntime. On a Jetson the venv
# sees the platform's packages (--system-site-packages): install onnxruntime-gpu (NVIDIA's
# Jetson wheel) or TensorRT from JetPack first, and this script keeps them.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/opt/ngcal
bundle=""
dry_run=0
python=python3

usage() { sed -n '2,10p' "$0"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --prefix) prefix="$2"; shift ;;
        --bundle) bundle="$2"; shift ;;
        --python) python="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install-edge: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

step=0
run() {  # print the step; run it unless --dry-run
    step=$((step + 1))
    echo "[$step] $*"
    if [ "$dry_run" -eq 0 ]; then
        "$@"
    fi
}
note() { echo "    $*"; }

venv="$prefix/venv"
etc=/etc/ngcal
if [ "$dry_run" -eq 1 ]; then
    echo "install-edge: dry run: nothing is changed"
fi

# 1. Python >= 3.10 (JetPack 6 ships 3.10)
run "$python" -c 'import sys; assert sys.version_info >= (3, 10), sys.version'

# 2. a venv that sees the platform's onnxruntime-gpu / TensorRT
run "$python" -m venv --system-site-packages "$venv"

# 3. ngcal without torch; onnxruntime only where the platform has none
run "$venv/bin/pip" install --no-deps "$repo"
run "$venv/bin/pip" install "numpy>=1.24" "pillow>=10.0" "pydantic>=2.5,<3" "pyyaml>=6.0" \
    "scipy>=1.10" "paho-mqtt>=2.0,<3" "watchdog>=4.0"
if [ "$dry_run" -eq 1 ] || ! "$venv/bin/python" -c 'import onnxruntime' 2>/dev/null; then
    note "(only when the platform has no onnxruntime: on a Jetson install NVIDIA's onnxruntime-gpu wheel instead)"
    run "$venv/bin/pip" install "onnxruntime>=1.17"
fi
run ln -sf "$venv/bin/ngcal" /usr/local/bin/ngcal

# 4. config, camera folders, bundle
run install -d -m 0755 "$etc" /srv/ngcal/cameras /srv/ngcal/confirmed
if [ "$dry_run" -eq 1 ] || [ ! -e "$etc/daemon.yaml" ]; then
    run install -m 0644 "$repo/configs/daemon.example.yaml" "$etc/daemon.yaml"
    note "edit $etc/daemon.yaml: device_id, cameras, mqtt host/port/username, tls.ca_file"
fi
if [ -n "$bundle" ]; then
    run rm -rf "$prefix/bundle"
    run cp -r "$bundle" "$prefix/bundle"
else
    note "no --bundle: copy one (ngcal build's B/bundle) to $prefix/bundle later"
fi

# 5. the MQTT password as an encrypted systemd credential (never in the config)
note "MQTT password: systemd-creds encrypt --name=mqtt-password - $etc/mqtt-password.cred"
note "  (type the password, then Ctrl-D; the unit loads it with LoadCredentialEncrypted=)"

# 6. the service
run install -m 0644 "$repo/systemd/ngcal.service" /etc/systemd/system/ngcal.service
run systemctl daemon-reload
run ngcal serve --config "$etc/daemon.yaml" --check-config
note "TensorRT: the engine is built on this device at the first start (minutes on a Jetson);"
note "  set runtime.backend: tensorrt (or ort-tensorrt) and runtime.cache_dir in $etc/daemon.yaml"
run systemctl enable --now ngcal

# 7. check it
run systemctl --no-pager status ngcal
note "logs: journalctl -u ngcal -f; state: ngcal status --state-dir /var/lib/ngcal"
