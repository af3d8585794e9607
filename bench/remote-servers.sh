#!/usr/bin/env bash
# remote-servers.sh DIR QCOW WORK: serves DIR over HTTP with nginx (nginx-light) and the qcow2 QCOW
# as an NBD export `disk` with qemu-nbd (-f qcow2, read-only, cache=none off: page cache as for the
# local cases), both on loopback, for the remote convert cases. Prints "PORT SOCKET" once both
# listen and stays in the foreground until killed (then stops both).
set -euo pipefail
dir=$1 qcow=$2 work=$3
mkdir -p "$work/t"
nginx=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $nginx ]] || { echo "remote-servers.sh: nginx not found (apt-get install nginx-light)" >&2; exit 1; }
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sock=$work/nbd.sock
cat > "$work/nginx.conf" <<CONF
daemon off; master_process off; worker_processes 1; pid $work/nginx.pid; error_log $work/error.log;
events { worker_connections 256; }
http {
  access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path $work/t; proxy_temp_path $work/t; fastcgi_temp_path $work/t;
  uwsgi_temp_path $work/t; scgi_temp_path $work/t;
  default_type application/octet-stream;
  server { listen 127.0.0.1:$port; root $dir; }
}
CONF
"$nginx" -c "$work/nginx.conf" -e "$work/error.log" &
npid=$!
rm -f "$sock"
qemu-nbd -r -t -e 16 -x disk -f qcow2 -k "$sock" "$qcow" &
qpid=$!
trap 'kill $npid $qpid 2>/dev/null; wait 2>/dev/null' EXIT TERM INT
for _ in $(seq 1000); do
    [[ -S $sock ]] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.01
done
echo "$port $sock"
wait
