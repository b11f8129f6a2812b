#!/bin/sh
# shellcheck disable=SC2154 # udhcpc passes interface, ip, router, dns in the environment
# kiln: busybox udhcpc's hook in the initramfs (netboot only): put the
# leased address and default route on the interface, nothing else.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for r in $router; do
            ip route replace default via "$r" dev "$interface"
            break
        done
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        ;;
esac
exit 0
