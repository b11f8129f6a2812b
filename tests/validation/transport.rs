//! `hub-transport`, `hub-tcp-port` and `[wireguard.sites.NAME]`.

use super::{GOOD, errors, one, with};

/// GOOD as a hub topology around s1, with a1 in site "home".
fn hub(extra_wg: &str, a1_extra: &str) -> String {
    with(
        "network = \"10.0.0.0/24\"\n",
        &format!("network = \"10.0.0.0/24\"\ntopology = \"hub\"\nhub = \"s1\"\n{extra_wg}"),
    )
    .replacen(
        "wireguard-address = \"10.0.0.12\"\n",
        &format!("wireguard-address = \"10.0.0.12\"\nsite = \"home\"\n{a1_extra}"),
        1,
    )
    .replacen(
        "mac = \"52:54:00:00:00:01\"\n",
        "mac = \"52:54:00:00:00:01\"\nendpoint = \"s1.example.org:51830\"\n",
        1,
    )
}

#[test]
fn transports_by_node_site_and_cluster_pass() {
    for (wg, node) in [
        ("hub-transport = \"tcp\"\n", ""),
        (
            "hub-tcp-port = 8443\n[wireguard.sites.home]\nhub-transport = \"auto\"\n",
            "",
        ),
        ("", "hub-transport = \"tcp\"\n"),
    ] {
        let text = hub(wg, node);
        assert!(errors(&text).is_empty(), "{text}\n{:?}", errors(&text));
    }
}

#[test]
fn unknown_transport_lists_the_known_ones() {
    let e = one(
        &hub("", "hub-transport = \"tls\"\n"),
        25,
        "hub-transport",
        "unknown hub transport `tls`",
    );
    assert!(
        e.hint.contains("\"udp\"") && e.hint.contains("\"tcp\"") && e.hint.contains("\"auto\""),
        "{e}"
    );
}

#[test]
fn transport_in_a_mesh_is_refused() {
    one(
        &with(
            "network = \"10.0.0.0/24\"\n",
            "network = \"10.0.0.0/24\"\nhub-transport = \"tcp\"\n",
        ),
        9,
        "wireguard.hub-transport",
        "topology is mesh",
    );
}

#[test]
fn a_site_table_must_name_a_site_of_some_node() {
    let e = one(
        &hub("[wireguard.sites.campus]\nhub-transport = \"tcp\"\n", ""),
        11,
        "wireguard.sites.campus",
        "no node is in site `campus`",
    );
    assert!(e.hint.contains("home"), "{e}");
}

#[test]
fn the_hub_node_does_not_dial_itself() {
    let text = hub("", "").replacen(
        "endpoint = \"s1.example.org:51830\"\n",
        "endpoint = \"s1.example.org:51830\"\nhub-transport = \"tcp\"\n",
        1,
    );
    one(
        &text,
        17,
        "hub-transport",
        "is the hub: it does not dial itself",
    );
}

#[test]
fn auto_needs_the_external_hubs_address() {
    let text = with(
        "network = \"10.0.0.0/24\"\n",
        "network = \"10.0.0.0/24\"\ntopology = \"hub\"\nhub = \"vps\"\nhub-transport = \"auto\"\n[[wireguard.peers]]\nname = \"vps\"\npublic-key = \"in8aLqpdujLG8XAFqR8Hys5zP2Uu4hNoUkomX1oX1X4=\"\nendpoint = \"hub.example.org:51820\"\nallowed-ips = [\"192.168.50.0/24\"]\n",
    );
    let e = one(&text, 11, "wireguard.hub-transport", "has no `address`");
    assert!(e.hint.contains("address = "), "{e}");
}

#[test]
fn the_relay_port_is_not_a_listen_port() {
    let text = hub("listen-port = 51839\nhub-transport = \"tcp\"\n", "");
    one(&text, 11, "wireguard.listen-port", "51839");
}

#[test]
fn a_good_profile_without_transport_keys_is_unchanged() {
    assert!(errors(GOOD).is_empty());
}
