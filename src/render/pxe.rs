//! The netboot tree: what `kiln build --format pxe` writes under OUT/pxe
//! and `kiln serve` serves. Pure text; the build writes it, the server
//! renders the server address into it.
//!
//! ```text
//! pxe/boot.ipxe                  chains mac/<mac>.ipxe of the booting NIC
//! pxe/mac/52-54-00-12-34-01.ipxe one per node with a `mac`
//! pxe/vmlinuz, pxe/initrd.img    the kernel and initramfs of the disk images
//! pxe/root-<role>.sqfs           the root image (the same bytes as root-a; one per
//!                                distinct root: agents share root-server.sqfs when
//!                                their roots are the same)
//! pxe/seed/<node>.img            the node seed (secrets: 0600)
//! pxe/update/<node>.txt          the node's update bundle (kiln-update)
//! ```
//!
//! The scripts say `${kiln-server}` wherever the server's URL goes: an
//! iPXE setting, so the tree also works from any static HTTP server if the
//! bootstrap script sets it; `kiln serve` replaces it with the address
//! the request came to.

use crate::config::plan::{NodePlan, Plan};
use crate::config::types::MacAddr;

/// The placeholder for the server's URL (`http://host:port`).
pub const SERVER_VAR: &str = "${kiln-server}";
pub const DIR: &str = "pxe";
pub const BOOT_SCRIPT: &str = "boot.ipxe";
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd.img";
/// The iPXE script a TFTP server hands out (`kiln serve --tftp`).
pub const TFTP_SCRIPT: &str = "kiln.ipxe";

/// `52-54-00-12-34-01`: iPXE's `${mac:hexhyp}`.
pub fn mac_name(mac: &MacAddr) -> String {
    mac.to_string().replace(':', "-")
}

pub fn mac_script_path(mac: &MacAddr) -> String {
    format!("mac/{}.ipxe", mac_name(mac))
}

pub fn seed_path(node: &str) -> String {
    format!("seed/{node}.img")
}

pub fn update_path(node: &str) -> String {
    format!("update/{node}.txt")
}

/// What `kiln-update` on a node reads: the files of its next slot (paths
/// relative to the tree, as the server serves them) with their sha256,
/// and the versions. `key=value` lines, so a shell script can read it.
pub struct UpdateBundle<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    pub kiln_version: &'a str,
    pub k3s_version: &'a str,
    pub kernel_version: &'a str,
    /// Kernel command line, with [`crate::render::boot::SLOT_PLACEHOLDER`].
    pub options: &'a str,
    /// Root image: file name, size, sha256.
    pub root: (&'a str, u64, &'a str),
    pub vmlinuz: &'a str,
    pub initrd: &'a str,
    pub seed: &'a str,
}

impl UpdateBundle<'_> {
    pub fn render(&self) -> String {
        format!(
            "# kiln update bundle for node {node} of cluster {cluster}: run\n\
             # `kiln-update --server URL` on the node (kiln serve's URL).\n\
             format=1\n\
             cluster={cluster}\n\
             node={node}\n\
             kiln_version={kiln}\n\
             k3s_version={k3s}\n\
             kernel_version={kernel}\n\
             options={options}\n\
             root={root}\n\
             root_size={root_size}\n\
             root_sha256={root_sha}\n\
             vmlinuz={KERNEL}\n\
             vmlinuz_sha256={vmlinuz}\n\
             initrd={INITRD}\n\
             initrd_sha256={initrd}\n\
             seed={seed_path}\n\
             seed_sha256={seed}\n",
            node = self.node,
            cluster = self.cluster,
            kiln = self.kiln_version,
            k3s = self.k3s_version,
            kernel = self.kernel_version,
            options = self.options,
            root = self.root.0,
            root_size = self.root.1,
            root_sha = self.root.2,
            vmlinuz = self.vmlinuz,
            initrd = self.initrd,
            seed_path = seed_path(self.node),
            seed = self.seed,
        )
    }
}

/// The kernel command line of a netbooted node (`root` is the root image's
/// path in the tree).
pub fn options(plan: &Plan, node: &NodePlan, root: &str, root_sha256: &str) -> String {
    let mut items = vec![
        // The 2019 iPXE EFI build hands initrds to the kernel only when
        // the command line names them.
        format!("initrd={INITRD}"),
        "initrd=seed.img".to_string(),
        format!("kiln.root={SERVER_VAR}/{root}"),
        format!("kiln.root.sha256={root_sha256}"),
    ];
    if let Some(mac) = node.mac {
        items.push(format!("kiln.netif={mac}"));
    }
    items.extend(
        crate::render::boot::KILN_KERNEL_ARGS
            .iter()
            .map(|s| s.to_string()),
    );
    items.extend(plan.cmdline(node));
    items.join(" ")
}

/// The per-MAC script of one node.
pub fn node_script(plan: &Plan, node: &NodePlan, root: &str, root_sha256: &str) -> String {
    let mac = node.mac.map(|m| m.to_string()).unwrap_or_default();
    format!(
        "#!ipxe\n\
         # kiln: node {name} ({role}) of cluster {cluster}, MAC {mac}.\n\
         # Written by kiln build; kiln serve fills in {SERVER_VAR}.\n\
         echo kiln: booting {name} ({role} of {cluster}, k3s {k3s}) from {SERVER_VAR}\n\
         kernel {SERVER_VAR}/{KERNEL} {opts} || goto failed\n\
         initrd --name {INITRD} {SERVER_VAR}/{INITRD} || goto failed\n\
         initrd --name seed.img {SERVER_VAR}/{seed} || goto failed\n\
         boot || goto failed\n\
         :failed\n\
         echo kiln: could not load {name}'s boot files from {SERVER_VAR} (is kiln serve running?); rebooting in 30 s\n\
         sleep 30\n\
         reboot\n",
        name = node.name,
        role = node.role.as_str(),
        cluster = plan.cluster,
        k3s = plan.k3s.version,
        opts = options(plan, node, root, root_sha256),
        seed = seed_path(&node.name),
    )
}

/// The top-level script: chain the booting NIC's per-MAC script, or say
/// clearly that this machine is not in the profile.
pub fn boot_script(plan: &Plan) -> String {
    let profile = plan
        .profile_path
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    format!(
        "#!ipxe\n\
         # kiln: cluster {cluster}. Chains the script of the booting NIC's MAC.\n\
         chain --autofree {SERVER_VAR}/mac/${{netX/mac:hexhyp}}.ipxe || goto unknown\n\
         :unknown\n\
         echo\n\
         echo kiln: no node of cluster {cluster} has MAC ${{netX/mac}} (or {SERVER_VAR} did not answer).\n\
         echo kiln: to netboot this machine, give its [[nodes]] table mac = \"${{netX/mac}}\" in {profile},\n\
         echo kiln: run kiln build --format pxe again and restart kiln serve.\n\
         echo kiln: trying the next boot device in 30 s.\n\
         sleep 30\n\
         exit 1\n",
        cluster = plan.cluster,
    )
}

/// The script a TFTP server hands to iPXE: set the server and chain.
pub fn tftp_script(server_url: &str) -> String {
    format!(
        "#!ipxe\n\
         # kiln: handed out by TFTP; everything else comes over HTTP.\n\
         set kiln-server {server_url}\n\
         chain --autofree {SERVER_VAR}/{BOOT_SCRIPT}\n"
    )
}

/// Fill in the server URL.
pub fn render(script: &str, server_url: &str) -> String {
    script.replace(SERVER_VAR, server_url)
}

/// A dnsmasq configuration for a LAN whose router already runs DHCP:
/// proxy DHCP (no addresses handed out) and TFTP for the iPXE binaries and
/// the bootstrap script; iPXE then loads everything over HTTP. One service
/// per architecture and tag (several make iPXE reload itself), no prompt
/// (with one item the client boots at once), BC_EFI as well as X86-64_EFI
/// (UEFI clients send architecture 7 or 9). Checked with dnsmasq 2.90
/// (Debian 12) against OVMF and iPXE; dnsmasq 2.92 breaks proxy DHCP on
/// port 4011 (fixed in 2.93).
pub fn dnsmasq_snippet(lan: &str, tftp_root: &str) -> String {
    format!(
        "# kiln: PXE next to an existing DHCP server (dnsmasq in proxy-DHCP mode).\n\
         # Open UDP 67, 69 and 4011 and kiln serve's TCP port on this machine.\n\
         # No DNS; never hand out addresses: the router stays the DHCP server.\n\
         port=0\n\
         # interface=eth0   (the LAN interface; with bind-interfaces)\n\
         dhcp-range={lan},proxy\n\
         log-dhcp\n\
         # iPXE says so in its requests (user class \"iPXE\", option 175).\n\
         dhcp-userclass=set:ipxe,iPXE\n\
         dhcp-match=set:ipxe,175\n\
         # Firmware PXE: load iPXE over TFTP (BIOS; UEFI x86-64 as arch 7 or 9).\n\
         pxe-service=tag:!ipxe,x86PC,\"kiln: iPXE (BIOS)\",undionly.kpxe\n\
         pxe-service=tag:!ipxe,X86-64_EFI,\"kiln: iPXE (UEFI)\",ipxe.efi\n\
         pxe-service=tag:!ipxe,BC_EFI,\"kiln: iPXE (UEFI)\",ipxe.efi\n\
         # iPXE: the bootstrap script, which chains kiln serve over HTTP.\n\
         pxe-service=tag:ipxe,x86PC,\"kiln\",{TFTP_SCRIPT}\n\
         pxe-service=tag:ipxe,X86-64_EFI,\"kiln\",{TFTP_SCRIPT}\n\
         pxe-service=tag:ipxe,BC_EFI,\"kiln\",{TFTP_SCRIPT}\n\
         enable-tftp\n\
         tftp-root={tftp_root}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        let text = "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\n[boot]\ncmdline = [\"pcie_aspm=off\"]\n[[nodes]]\nname = \"n1\"\nrole = \"server\"\nmac = \"52:54:00:aa:bb:01\"\n";
        crate::config::plan::plan_profile(std::path::Path::new("lab.toml"), text).unwrap()
    }

    #[test]
    fn node_script_names_everything_and_fills_in_the_server() {
        let p = plan();
        let s = node_script(&p, &p.nodes[0], "root-server.sqfs", &"ab".repeat(32));
        let r = render(&s, "http://10.1.2.3:8080");
        assert!(!r.contains("${kiln-server}"));
        let kernel = r.lines().find(|l| l.starts_with("kernel ")).unwrap();
        for want in [
            "http://10.1.2.3:8080/vmlinuz",
            "initrd=initrd.img",
            "initrd=seed.img",
            "kiln.root=http://10.1.2.3:8080/root-server.sqfs",
            &format!("kiln.root.sha256={}", "ab".repeat(32)),
            "kiln.netif=52:54:00:aa:bb:01",
            "pcie_aspm=off",
            "panic=10",
        ] {
            assert!(
                kernel.split_whitespace().any(|a| a == want),
                "{want} in {kernel}"
            );
        }
        assert!(r.contains("initrd --name seed.img http://10.1.2.3:8080/seed/n1.img"));
        assert!(!kernel.contains("kiln.slot"));
    }

    #[test]
    fn boot_script_chains_by_mac_and_explains_an_unknown_one() {
        let s = boot_script(&plan());
        assert!(s.contains(
            "chain --autofree ${kiln-server}/mac/${netX/mac:hexhyp}.ipxe || goto unknown"
        ));
        assert!(s.contains("no node of cluster lab has MAC ${netX/mac}"));
        assert!(s.contains("lab.toml"));
        assert!(s.trim_end().ends_with("exit 1"));
    }

    #[test]
    fn mac_paths_match_ipxe_hexhyp() {
        let p = plan();
        assert_eq!(
            mac_script_path(p.nodes[0].mac.as_ref().unwrap()),
            "mac/52-54-00-aa-bb-01.ipxe"
        );
    }

    #[test]
    fn tftp_script_sets_the_server() {
        let s = tftp_script("http://192.168.1.10:8080");
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("set kiln-server http://192.168.1.10:8080\n"));
        assert!(s.contains("chain --autofree ${kiln-server}/boot.ipxe"));
    }
}
