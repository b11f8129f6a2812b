#!/bin/sh
# kiln-wg-transport: reach the WireGuard hub over UDP, and over TCP through
# kiln-relay while the hub does not answer over UDP (a network that drops
# UDP). Probes by pinging the hub's tunnel address through the tunnel:
# WireGuard answers on the path the last packet came by, so an answer means
# that path works. Settings come from /etc/kiln/wg-transport.env.
set -u
: "${IFACE:?}" "${HUB_KEY:?}" "${UDP_ENDPOINT:?}" "${TCP_ENDPOINT:?}" "${PROBE:?}"
EVERY=${EVERY:-10}          # seconds between probes
FAILS=${FAILS:-3}           # failed probes in a row before switching to TCP
RETRY_UDP=${RETRY_UDP:-300} # seconds on TCP before trying UDP again
STATE=${STATE:-/run/kiln/wg-transport}

mode=
# use MODE ENDPOINT: send to the hub at ENDPOINT; MODE is recorded in
# $STATE (for `kiln test` and people) once it is the one in use.
use() {
    wg set "$IFACE" peer "$HUB_KEY" endpoint "$2" || return 1
    mode=$1
}
record() {
    mkdir -p "$(dirname "$STATE")"
    echo "$mode" >"$STATE"
}
# Three pings, two seconds each: any answer will do.
answers() { busybox ping -q -c 3 -W 2 -I "$IFACE" "$PROBE" >/dev/null 2>&1; }

until use udp "$UDP_ENDPOINT"; do
    echo "kiln-wg-transport: cannot set the hub endpoint $UDP_ENDPOINT yet (does the name resolve?)"
    sleep "$EVERY"
done
record
echo "kiln-wg-transport: using udp to the hub at $UDP_ENDPOINT"
failed=0
on_tcp=0
while sleep "$EVERY"; do
    if [ "$mode" = udp ]; then
        if answers; then failed=0; else failed=$((failed + 1)); fi
        if [ "$failed" -ge "$FAILS" ] && use tcp "$TCP_ENDPOINT"; then
            record
            echo "kiln-wg-transport: switched to tcp: the hub ($PROBE) did not answer over udp $failed times in a row; kiln-relay carries the tunnel"
            failed=0
            on_tcp=0
        fi
        continue
    fi
    on_tcp=$((on_tcp + EVERY))
    [ "$on_tcp" -ge "$RETRY_UDP" ] || continue
    on_tcp=0
    use udp "$UDP_ENDPOINT" || continue
    if answers; then
        record
        echo "kiln-wg-transport: switched to udp: the hub answers over udp again"
    else
        use tcp "$TCP_ENDPOINT"
        echo "kiln-wg-transport: udp still gets no answer; staying on tcp"
    fi
done
