#!/usr/bin/env bash
# A local Orthanc PACS with DICOMweb for TextDiff Label, reachable only from this machine.
#   bash scripts/orthanc.sh start [PORT]   install (Debian orthanc + orthanc-dicomweb) if needed, start, wait until ready
#   bash scripts/orthanc.sh stop           stop it cleanly
#   bash scripts/orthanc.sh status         whether it runs and where it listens
#   bash scripts/orthanc.sh reset          stop it and delete its storage
# ORTHANC_DIR (default .orthanc/) holds our configuration, its storage, log and pid file.
#
# Orthanc 1.10 has no setting for the HTTP bind address (it binds every interface; RemoteAccessAllowed=false only
# refuses remote requests after accepting the connection). So we start it with a tiny LD_PRELOAD shim that turns
# its bind() to the wildcard address into a bind to the loopback address: the socket listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ORTHANC_DIR=$(realpath -m "${ORTHANC_DIR:-.orthanc}")
PID_FILE="$ORTHANC_DIR/orthanc.pid"
LOG="$ORTHANC_DIR/orthanc.log"
PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so

alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }  # zombies count as gone
running() { [ -f "$PID_FILE" ] && alive "$(cat "$PID_FILE")"; }

listening() {  # the local addresses listening on port $1 (hex from /proc/net/tcp*, printed as ADDR:PORT)
    local hex; hex=$(printf '%04X' "$1")
    awk -v p=":$hex" 'FNR > 1 && $4 == "0A" && $2 ~ p"$" {print $2}' /proc/net/tcp /proc/net/tcp6
}

loopback_shim() {  # compile the bind() shim once
    local so="$ORTHANC_DIR/bind-loopback.so"
    [ -f "$so" ] && { echo "$so"; return; }
    cat > "$ORTHANC_DIR/bind-loopback.c" <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
/* bind() to the wildcard address becomes a bind to loopback, so a server cannot be reached from other machines. */
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4; memcpy(&in4, addr, sizeof in4);
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return real_bind(fd, (struct sockaddr *)&in4, sizeof in4);
    }
    if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6; memcpy(&in6, addr, sizeof in6);
        if (!memcmp(&in6.sin6_addr, &in6addr_any, sizeof in6addr_any)) in6.sin6_addr = in6addr_loopback;
        return real_bind(fd, (struct sockaddr *)&in6, sizeof in6);
    }
    return real_bind(fd, addr, len);
}
EOF
    cc -shared -fPIC -O2 -o "$so" "$ORTHANC_DIR/bind-loopback.c" -ldl
    echo "$so"
}

write_config() {
    cat > "$ORTHANC_DIR/orthanc.json" <<EOF
{
  "Name": "TextDiffPACS",
  "StorageDirectory": "$ORTHANC_DIR/db",
  "IndexDirectory": "$ORTHANC_DIR/db",
  "HttpPort": $1,
  "DicomServerEnabled": false,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "Plugins": ["$PLUGIN"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true, "WadoRoot": "/wado", "Ssl": false,
               "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
}
EOF
}

start() {
    local port=${1:-8042}
    mkdir -p "$ORTHANC_DIR/db"
    if running; then echo "Orthanc already running (pid $(cat "$PID_FILE")): $(listening "$port" | tr '\n' ' ')"; return; fi
    if [ -n "$(listening "$port")" ]; then echo "port $port is already taken by another program" >&2; exit 1; fi
    bash scripts/system-packages.sh
    local shim; shim=$(loopback_shim)
    write_config "$port"
    LD_PRELOAD="$shim" nohup Orthanc "$ORTHANC_DIR/orthanc.json" > "$LOG" 2>&1 &
    echo $! > "$PID_FILE"
    for _ in $(seq 120); do
        if python3 - "$port" <<'EOF' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/dicom-web/studies", timeout=2)
EOF
            echo "Orthanc ready: http://127.0.0.1:$port/dicom-web (listening on $(listening "$port" | tr '\n' ' '))"
            return
        fi
        running || break
        sleep 0.5
    done
    echo "Orthanc did not start; last lines of $LOG:" >&2; tail -20 "$LOG" >&2; stop; exit 1
}

stop() {
    running || { rm -f "$PID_FILE"; echo "Orthanc is not running"; return; }
    local pid; pid=$(cat "$PID_FILE")
    kill -TERM "$pid"
    for _ in $(seq 60); do alive "$pid" || { rm -f "$PID_FILE"; echo "Orthanc stopped"; return; }; sleep 0.5; done
    echo "warning: Orthanc did not stop within 30 s; killing it" >&2
    kill -KILL "$pid"; rm -f "$PID_FILE"
}

case "${1:-}" in
    start) start "${2:-8042}" ;;
    stop) stop ;;
    status) if running; then echo "running (pid $(cat "$PID_FILE"))"; else echo "not running"; fi ;;
    reset) stop; rm -rf "$ORTHANC_DIR/db" ;;
    *) echo "usage: $0 start [PORT] | stop | status | reset" >&2; exit 2 ;;
esac
