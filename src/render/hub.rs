//! The bundle `kiln hub` writes for an external hub (a Debian VPS kiln
//! does not build): its WireGuard config with every node and operator as
//! a peer, forwarding, a firewall table for the tunnel, and when a node
//! reaches the hub over TCP the `kiln-relay` server's unit. Pure: the
//! verb adds the relay binary and writes the files.
//!
//! The hub's private key never leaves the hub: the config loads it from
//! `/etc/wireguard/<iface>.key` (`PostUp`), the key whose public half the
//! profile names.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ipnet::IpNet;

use crate::config::plan::{HubRef, Plan, WgPlan};
use crate::config::types::WgKey;

use super::{header, hub_peer_stanzas, relay};

/// Where the bundle installs the relay on the hub.
pub const HUB_RELAY_PATH: &str = "/usr/local/lib/kiln/kiln-relay";

/// One file of the bundle: its name in the bundle, mode, bytes.
pub struct BundleFile {
    pub name: String,
    pub mode: u32,
    pub text: String,
}

/// The bundle's text files, or why this profile has no external hub to
/// write one for.
pub fn bundle(
    plan: &Plan,
    public_keys: &BTreeMap<String, WgKey>,
    operator_keys: &BTreeMap<String, WgKey>,
) -> Result<Vec<BundleFile>, String> {
    let wg = plan
        .wireguard
        .as_ref()
        .ok_or("the profile has no [wireguard]")?;
    let Some(HubRef::External(i)) = wg.hub else {
        return Err("the profile has no external hub: set `topology = \"hub\"` and `hub` to one of the [[wireguard.peers]] (a hub node is built by kiln and needs no bundle)".into());
    };
    let hub = &wg.peers[i];
    let address = hub.address.ok_or_else(|| format!("the hub `{}` has no `address`: add its address in the tunnel network to its [[wireguard.peers]] entry", hub.name))?;
    let port = hub.endpoint.as_ref().map_or(wg.listen_port, |e| e.port);
    let iface = &wg.interface;
    let h = header("#", plan);
    let mut conf = format!(
        "{h}# The WireGuard config of the hub `{}`.\n[Interface]\n",
        hub.name
    );
    let _ = write!(
        conf,
        "Address = {address}/{}\nListenPort = {port}\n# The hub's own key, kept on the hub (its public half is in the profile).\nPostUp = wg set %i private-key /etc/wireguard/%i.key\n",
        wg.network.prefix_len()
    );
    conf.push('\n');
    conf.push_str(&hub_peer_stanzas(plan, public_keys, operator_keys));
    let mut files = vec![
        BundleFile {
            name: format!("{iface}.conf"),
            mode: 0o600,
            text: conf,
        },
        BundleFile {
            name: "99-kiln-hub.conf".into(),
            mode: 0o644,
            text: format!("{h}{}=1\n", forward_key(wg.network)),
        },
        BundleFile {
            name: "kiln-hub.nft".into(),
            mode: 0o644,
            text: firewall(&h, wg, port),
        },
        BundleFile {
            name: "kiln-hub-firewall.service".into(),
            mode: 0o644,
            text: format!(
                "{h}[Unit]\nDescription=kiln: the hub's firewall table for the tunnel\nBefore=wg-quick@{iface}.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/sbin/nft -f /etc/kiln-hub/kiln-hub.nft\nExecStop=/usr/sbin/nft delete table inet kiln_hub\n\n[Install]\nWantedBy=multi-user.target\n"
            ),
        },
    ];
    if wg.uses_relay() {
        files.push(BundleFile {
            name: "kiln-relay.service".into(),
            mode: 0o644,
            text: relay::server_unit(
                &h,
                &WgPlan {
                    listen_port: port,
                    ..wg.clone()
                },
                HUB_RELAY_PATH,
            ),
        });
    }
    files.push(BundleFile {
        name: "install.sh".into(),
        mode: 0o755,
        text: install_script(&h, wg),
    });
    Ok(files)
}

fn forward_key(net: IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "net.ipv4.ip_forward",
        IpNet::V6(_) => "net.ipv6.conf.all.forwarding",
    }
}

/// A table of its own, beside whatever the hub already runs: the tunnel
/// port (and the relay's) open, and forwarding only inside the tunnel.
fn firewall(h: &str, wg: &WgPlan, port: u16) -> String {
    let iface = &wg.interface;
    let tcp = if wg.uses_relay() {
        format!(
            "        tcp dport {} accept comment \"kiln-relay: nodes whose network drops UDP\"\n",
            wg.hub_tcp_port
        )
    } else {
        String::new()
    };
    format!(
        "#!/usr/sbin/nft -f\n{h}# Opens the tunnel's ports; forwards between tunnel hosts only (nodes of\n# different sites, operators), never from the tunnel to the hub's other networks.\ntable inet kiln_hub\ndelete table inet kiln_hub\ntable inet kiln_hub {{\n    chain input {{\n        type filter hook input priority filter - 1; policy accept;\n        udp dport {port} accept comment \"WireGuard\"\n{tcp}    }}\n    chain forward {{\n        type filter hook forward priority filter - 1; policy accept;\n        iifname \"{iface}\" oifname \"{iface}\" accept\n        iifname \"{iface}\" drop\n        oifname \"{iface}\" drop\n    }}\n}}\n"
    )
}

fn install_script(h: &str, wg: &WgPlan) -> String {
    let iface = &wg.interface;
    let relay = if wg.uses_relay() {
        format!(
            "install -D -m 0755 kiln-relay {HUB_RELAY_PATH}\ninstall -m 0644 kiln-relay.service /etc/systemd/system/kiln-relay.service\n"
        )
    } else {
        String::new()
    };
    let units = if wg.uses_relay() {
        " kiln-relay.service"
    } else {
        ""
    };
    format!(
        "#!/bin/sh\n{h}# Applies this bundle on the hub (Debian, as root): ./install.sh\nset -eu\ncd \"$(dirname \"$0\")\"\nsha256sum -c --quiet SHA256SUMS\nfor c in wg wg-quick nft systemctl; do\n    command -v \"$c\" >/dev/null || {{ echo \"install.sh: $c is missing: apt-get install wireguard-tools nftables\" >&2; exit 1; }}\ndone\nif [ ! -s /etc/wireguard/{iface}.key ]; then\n    echo \"install.sh: put the hub's private key in /etc/wireguard/{iface}.key (mode 0600) first: the profile names its public half\" >&2\n    exit 1\nfi\ninstall -m 0600 {iface}.conf /etc/wireguard/{iface}.conf\ninstall -m 0644 99-kiln-hub.conf /etc/sysctl.d/99-kiln-hub.conf\nsysctl -q -p /etc/sysctl.d/99-kiln-hub.conf\ninstall -D -m 0644 kiln-hub.nft /etc/kiln-hub/kiln-hub.nft\ninstall -m 0644 kiln-hub-firewall.service /etc/systemd/system/kiln-hub-firewall.service\n{relay}systemctl daemon-reload\nsystemctl enable kiln-hub-firewall.service wg-quick@{iface}.service{units}\nsystemctl restart kiln-hub-firewall.service wg-quick@{iface}.service{units}\necho \"install.sh: the hub is up: wg show {iface}\"\n"
    )
}
