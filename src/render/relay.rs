//! A node's side of the tunnel to the hub over TCP: the `kiln-relay`
//! client that carries WireGuard's packets, and with `hub-transport =
//! "auto"` the watcher that moves the hub's endpoint between UDP and the
//! relay. On a hub node, the relay server the TCP spokes dial.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::config::plan::{Link, Plan, RELAY_LOCAL_PORT, WgPlan};
use crate::config::profile::HubTransport;
use crate::config::types::{Endpoint, WgKey};
use crate::render::tree::FileTree;

use super::header;

/// Where images carry the relay binary.
pub const RELAY_BINARY: &str = "/usr/lib/kiln/kiln-relay";
/// Where the watcher of an "auto" node writes the transport in use.
pub const TRANSPORT_STATE: &str = "/run/kiln/wg-transport";
const WATCHER: &str = include_str!("wg-transport.sh");
/// Where images carry the watcher: in the root image, like the relay (a
/// seed may only write `/etc` and `/var`, see `SEED_DIRS`).
pub const WATCHER_PATH: &str = "/usr/lib/kiln/wg-transport";

/// What root images carry when a node of the profile uses `"auto"`: the
/// watcher script. (The relay binary is not rendered: the root image
/// stage copies it in.)
pub fn image_files(plan: &Plan) -> FileTree {
    let mut t = FileTree::new();
    let auto = plan
        .wireguard
        .as_ref()
        .is_some_and(|wg| wg.hub_transport.contains(&HubTransport::Auto));
    if auto {
        t.file(WATCHER_PATH, 0o755, WATCHER);
    }
    t
}

/// The client (and for "auto" the watcher) for a spoke whose hub link
/// goes over TCP.
pub fn render_client(
    plan: &Plan,
    wg: &WgPlan,
    transport: HubTransport,
    hub: &Link,
    hub_key: &WgKey,
    probe: Option<IpAddr>,
    tree: &mut FileTree,
) {
    let Some(relay) = &hub.relay else { return };
    let iface = &wg.interface;
    let unit = format!(
        "{}[Unit]\nDescription=kiln: WireGuard to the hub over TCP ({relay})\nWants=network-online.target\nAfter=network-online.target\nBefore=wg-quick@{iface}.service\n\n[Service]\nExecStart={RELAY_BINARY} client --udp 127.0.0.1:{RELAY_LOCAL_PORT} --tcp {relay}\nRestart=always\nRestartSec=2s\nDynamicUser=yes\n\n[Install]\nWantedBy=multi-user.target\n",
        header("#", plan)
    );
    enable(tree, "kiln-relay.service", unit);
    if transport != HubTransport::Auto {
        return;
    }
    let (Some(udp), Some(probe)) = (&hub.endpoint, probe) else {
        return;
    };
    let mut env = header("#", plan);
    let _ = write!(
        env,
        "IFACE={iface}\nHUB_KEY={hub_key}\nUDP_ENDPOINT={udp}\nTCP_ENDPOINT=127.0.0.1:{RELAY_LOCAL_PORT}\nPROBE={probe}\nSTATE={TRANSPORT_STATE}\n"
    );
    tree.file("/etc/kiln/wg-transport.env", 0o644, env);
    let unit = format!(
        "{}[Unit]\nDescription=kiln: the hub over UDP, or over TCP while UDP gets no answer\nAfter=wg-quick@{iface}.service kiln-relay.service\nRequires=wg-quick@{iface}.service\n\n[Service]\nEnvironmentFile=/etc/kiln/wg-transport.env\nExecStart={WATCHER_PATH}\nRestart=always\nRestartSec=5s\n\n[Install]\nWantedBy=multi-user.target\n",
        header("#", plan)
    );
    enable(tree, "kiln-wg-transport.service", unit);
}

/// The relay server on a hub node, for its spokes that use TCP.
pub fn render_server(plan: &Plan, wg: &WgPlan, tree: &mut FileTree) {
    let unit = server_unit(&header("#", plan), wg, RELAY_BINARY);
    enable(tree, "kiln-relay-server.service", unit);
}

/// The server's unit: TCP `hub_tcp_port` on every address to the hub's
/// WireGuard port on loopback.
pub fn server_unit(header: &str, wg: &WgPlan, binary: &str) -> String {
    format!(
        "{header}[Unit]\nDescription=kiln: WireGuard over TCP for nodes whose network drops UDP (kiln-relay)\nAfter=network.target\n\n[Service]\nExecStart={binary} server --tcp 0.0.0.0:{} --udp 127.0.0.1:{}\nRestart=always\nRestartSec=2s\nDynamicUser=yes\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n\n[Install]\nWantedBy=multi-user.target\n",
        wg.hub_tcp_port, wg.listen_port
    )
}

fn enable(tree: &mut FileTree, name: &str, unit: String) {
    tree.file(&format!("/etc/systemd/system/{name}"), 0o644, unit);
    tree.symlink(
        &format!("/etc/systemd/system/multi-user.target.wants/{name}"),
        &format!("/etc/systemd/system/{name}"),
    );
}

/// The endpoint text of a relay for people (`kiln check`).
pub fn describe(relay: &Endpoint) -> String {
    format!("TCP {relay} (kiln-relay)")
}
