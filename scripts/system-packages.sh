#!/usr/bin/env bash
# Debian packages behind the PACS and browser tests: Orthanc with DICOMweb, Chromium (driven headless by
# Playwright; no browser download), and a C compiler for Orthanc's loopback-only shim. Installs only what is missing.
set -euo pipefail
missing=()
command -v Orthanc >/dev/null || missing+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v chromium >/dev/null || missing+=(chromium fonts-liberation)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "missing system packages: ${missing[*]} (install them with apt-get as root)" >&2
    exit 1
fi
echo "installing system packages: ${missing[*]}"
policy=/usr/sbin/policy-rc.d created=""
if [ ! -e "$policy" ]; then  # keep the orthanc package from starting the system-wide service on port 8042
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=300 update -qq
apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
[ -z "$created" ] || rm -f "$policy"
