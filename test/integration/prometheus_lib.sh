# shellcheck shell=bash
# Sourced after lib.sh by the tests that run a real Prometheus server (Debian's package) against
# the daemons: free loopback ports, the server itself, and queries of its HTTP API.
#
#   free_ports N                      # N distinct free loopback ports in PORTS[]
#   prom_start CONFIG PORT            # prometheus on 127.0.0.1:PORT; P=its URL, PROM_PID
#   q PROMQL                          # the value of a one-series instant query ("" if none)
#   q_any PROMQL                      # true when the query has a result
#   until_eq SECONDS PROMQL WANT      # poll until the query gives WANT (a later scrape)

# free_ports N: N distinct loopback ports nobody listens on now, in PORTS.
free_ports() {
  PORTS=()
  local p
  while [ ${#PORTS[@]} -lt "$1" ]; do
    p=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    case " ${PORTS[*]} " in *" $p "*) ;; *) PORTS+=("$p") ;; esac
  done
}

# prom_start CONFIG PORT: checks CONFIG with promtool, starts the server (owned by the test, data
# in $W/prom) and waits until it is ready.
prom_start() {
  promtool check config "$1" >/dev/null || die "promtool rejects $1: $(promtool check config "$1" 2>&1)"
  mkdir -p "$W/prom"
  P=http://127.0.0.1:$2
  bg prometheus --config.file="$1" --storage.tsdb.path="$W/prom" \
    --web.listen-address="127.0.0.1:$2" --storage.tsdb.retention.time=1h \
    --log.level=warn >>"$W/prometheus.log" 2>&1
  PROM_PID=$BG_PID
  wait_for 30 curl -sf "$P/-/ready" || { tail -20 "$W/prometheus.log" >&2; die "prometheus not ready"; }
}

q() {
  curl -sf "$P/api/v1/query" --data-urlencode "query=$1" |
    jq -r 'if .data.result | length == 1 then .data.result[0].value[1] else "" end'
}

q_any() { [ -n "$(q "$1")" ]; }

until_eq() {
  local deadline=$(( $(date +%s) + $1 )) got
  while :; do
    got=$(q "$2")
    [ "$got" = "$3" ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || { echo "$2 = '$got', want $3" >&2; return 1; }
    sleep 0.5
  done
}
