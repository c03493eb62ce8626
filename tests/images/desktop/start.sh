#!/bin/sh
# The desktop image's entrypoint, keeping Kasm's contract: noVNC's web client and the VNC
# WebSocket (/websockify) over https on port 6901 (a self-signed certificate made at start),
# behind basic auth as user kasm_user with password $VNC_PW; home /home/kasm-user. Xvfb, twm and
# x11vnc (loopback only) run inside; everything runs as the image's non-root user.
set -eu
if [ -z "${VNC_PW:-}" ]; then
  echo "desktop: VNC_PW is not set (the basic-auth password of kasm_user)" >&2
  exit 1
fi
export HOME=/home/kasm-user DISPLAY=:1
run=$(mktemp -d /tmp/desktop.XXXXXX)
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=localhost \
  -keyout "$run/key.pem" -out "$run/cert.pem" 2>/dev/null
Xvfb :1 -screen 0 1280x800x24 -nolisten tcp >"$run/xvfb.log" 2>&1 &
i=0
while [ ! -e /tmp/.X11-unix/X1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
twm >"$run/twm.log" 2>&1 &
xterm -geometry 100x30+40+40 >/dev/null 2>&1 &
x11vnc -display :1 -rfbport 5901 -localhost -forever -shared -nopw -quiet >"$run/x11vnc.log" 2>&1 &
# websockify handles SIGTERM itself, so the pod stops at once rather than after its grace period.
exec websockify --web /usr/share/novnc --cert "$run/cert.pem" --key "$run/key.pem" --ssl-only \
  --web-auth --auth-plugin BasicHTTPAuth --auth-source "kasm_user:$VNC_PW" \
  6901 localhost:5901
