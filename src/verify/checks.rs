//! Checks run against a booted node: each compares what the plan and the
//! rendered files say with what the guest shows. Expected values come
//! from the plan and the rendered tree, never from constants here.

use std::io::Read as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use crate::config::plan::{NodePlan, Plan};
use crate::render::NodeFiles;
use crate::verify::vm::{Vm, VmConfig};

pub use crate::verify::report::{Check, Expect, Mark, Medium, Report};

/// A guest port kiln's firewall does not open from the LAN, used to show
/// that a blocked port does not connect from outside.
pub const PROBE_PORT: u16 = 10250;
/// Boot timeouts under TCG on a 2-core machine, with room to spare.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn rendered(files: &NodeFiles, path: &str) -> String {
    files.tree.text(path).unwrap_or("").to_string()
}

/// Start a listener on `port` in the guest that greets each client.
fn start_probe(vm: &Vm, key: &Path, port: u16) -> anyhow::Result<()> {
    vm.sh(key, &format!("systemd-run --unit=kiln-probe-{port} --collect systemd-socket-activate -l {port} -a --inetd /bin/echo kiln-probe >/dev/null"))?;
    Ok(())
}

/// Connect to a forwarded host port and read the greeting, if any.
fn greeting(port: u16) -> String {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))
    else {
        return "connection refused".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => "closed without data".into(),
        Ok(n) => String::from_utf8_lossy(&buf[..n]).trim().to_string(),
        Err(e) => format!("no data ({e})"),
    }
}

/// Checks that hold on any boot of the node, one group per concern.
pub fn checks_first_boot(vm: &Vm, key: &Path, e: &Expect) -> anyhow::Result<Vec<Check>> {
    let mut out = Vec::new();
    check_cmdline(vm, key, e, &mut out)?;
    check_root(vm, key, e, &mut out)?;
    check_identity(vm, key, e, &mut out)?;
    check_ssh(vm, key, e, &mut out)?;
    check_wireguard(vm, key, e, &mut out)?;
    check_firewall(vm, key, e, &mut out)?;
    check_k3s(vm, key, e, &mut out)?;
    crate::verify::cluster_ca::check_cluster_ca(vm, key, e, &mut out)?;
    crate::verify::manifests::check_manifests(vm, key, e, &mut out)?;
    crate::verify::manifests::check_proxy(vm, key, e, &mut out)?;
    crate::verify::storage::check_storage(vm, key, e, &mut out)?;
    check_state_fill(vm, key, e, &mut out)?;
    Ok(out)
}

/// The kernel command line carries the profile's items and the slot or root digest.
fn check_cmdline(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let plan = e.plan;
    let node = e.node;
    let sh = |s: &str| vm.sh(key, s);
    // Kernel command line.
    let cmdline = sh("cat /proc/cmdline")?;
    let mut want = plan.cmdline(node);
    match &e.medium {
        Medium::Disk => want.push("kiln.slot=a".into()),
        Medium::Net { root_sha256, .. } => want.push(format!("kiln.root.sha256={root_sha256}")),
    }
    let missing: Vec<&String> = want
        .iter()
        .filter(|w| !cmdline.split_whitespace().any(|a| a == w.as_str()))
        .collect();
    out.push(Check::new(
        "kernel command line",
        want.join(" "),
        cmdline.trim(),
        missing.is_empty(),
    ));
    Ok(())
}

/// / is the read-only root it should be; /usr refuses writes; /etc is in RAM.
fn check_root(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let sh = |s: &str| vm.sh(key, s);
    // Root: the slot's read-only squashfs, or the fetched image on a loop
    // device.
    match &e.medium {
        Medium::Disk => {
            let root = sh(
                "set -- $(findmnt -no SOURCE,FSTYPE,OPTIONS /); d=$(basename $1); echo \"$2 $(echo $3 | cut -d, -f1) $(sed -n 's/^PARTNAME=//p' /sys/class/block/$d/uevent)\"",
            )?;
            out.push(Check::eq(
                "/ is the slot's read-only squashfs",
                "squashfs ro root-a",
                &root,
            ));
        }
        Medium::Net { root_sha256, .. } => {
            let root = sh(
                "set -- $(findmnt -no SOURCE,FSTYPE,OPTIONS /); echo \"$2 $(echo $3 | cut -d, -f1) $(cat /sys/class/block/$(basename $1)/loop/backing_file)\"",
            )?;
            out.push(Check::eq(
                "/ is the fetched read-only squashfs, in RAM",
                "squashfs ro /run/kiln/netroot/root.sqfs",
                &root,
            ));
            let sha = sh("sha256sum /run/kiln/netroot/root.sqfs | cut -d' ' -f1")?;
            out.push(Check::eq(
                "the root image in RAM is the built one (sha256)",
                root_sha256,
                &sha,
            ));
        }
    }
    let write = sh("touch /usr/.kiln-probe 2>&1; echo \"exit $?\"")?;
    out.push(Check::new(
        "a write under /usr fails",
        "Read-only file system",
        write.trim(),
        write.contains("Read-only file system") && !write.contains("exit 0"),
    ));
    let etc = sh("findmnt -no FSTYPE /etc")?;
    out.push(Check::eq("/etc is writable in RAM", "overlay", &etc));
    Ok(())
}

/// Host name and /etc/hosts.
fn check_identity(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let node = e.node;
    let sh = |s: &str| vm.sh(key, s);
    // Identity.
    out.push(Check::eq("hostname", &node.hostname, &sh("hostname")?));
    out.push(Check::eq(
        "/etc/hosts",
        &rendered(e.files, "/etc/hosts"),
        &sh("cat /etc/hosts")?,
    ));
    Ok(())
}

/// SSH: each user's keys in, passwords out.
fn check_ssh(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let plan = e.plan;
    let sh = |s: &str| vm.sh(key, s);
    // SSH: keys in, passwords out.
    for u in &plan.first_boot.users {
        let expected = rendered(e.files, &format!("/etc/ssh/authorized_keys/{}", u.name));
        out.push(Check::eq(
            &format!("authorized keys of {}", u.name),
            &expected,
            &sh(&format!("cat /etc/ssh/authorized_keys/{}", u.name))?,
        ));
    }
    for (user, k) in &e.user_keys {
        let o = vm.ssh_as(k, user, "id -un", b"")?;
        let seen = if o.status.success() {
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        } else {
            String::from_utf8_lossy(&o.stderr).trim().to_string()
        };
        out.push(Check::eq(
            &format!("{user} logs in with its SSH key"),
            user,
            &seen,
        ));
    }
    let pw = crate::verify::vm::SSH
        .command()?
        .args(["-p", &vm.ssh_port().to_string()])
        .args(crate::verify::vm::SSH_OPTIONS)
        .args([
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "root@127.0.0.1",
            "true",
        ])
        .output()?;
    let pw_err = String::from_utf8_lossy(&pw.stderr).trim().to_string();
    out.push(Check::new(
        "password login is refused",
        "Permission denied (publickey)",
        &pw_err,
        !pw.status.success() && pw_err.contains("Permission denied (publickey)"),
    ));
    Ok(())
}

/// WireGuard up with the node's address, key and peers.
fn check_wireguard(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let plan = e.plan;
    let node = e.node;
    let sh = |s: &str| vm.sh(key, s);
    // WireGuard.
    if let Some(wg) = &plan.wireguard {
        let iface = &wg.interface;
        let addr = format!(
            "{}/{}",
            node.wireguard_address.expect("validated"),
            wg.network.prefix_len()
        );
        let seen = sh(&format!(
            "ip -o -4 addr show dev {iface} | awk '{{print $4}}'; ip -o link show dev {iface} | grep -o 'state [A-Z]*\\|,UP' | head -1"
        ))?;
        out.push(Check::new(
            "WireGuard interface up with its address",
            &addr,
            seen.trim(),
            seen.lines().next() == Some(addr.as_str()),
        ));
        out.push(Check::eq(
            "WireGuard public key (kiln keys)",
            &e.wg_public_key,
            &sh(&format!("wg show {iface} public-key"))?,
        ));
        let conf = rendered(e.files, &format!("/etc/wireguard/{iface}.conf"));
        let mut want: Vec<&str> = conf
            .lines()
            .filter_map(|l| l.strip_prefix("PublicKey = "))
            .collect();
        want.sort();
        let seen = sh(&format!("wg show {iface} peers | sort"))?;
        out.push(Check::eq("WireGuard peers", &want.join("\n"), &seen));
        check_relay_units(vm, key, e, wg, out)?;
    }
    Ok(())
}

/// A node that reaches its hub over TCP runs the relay client; a hub
/// node with such spokes runs the relay server.
fn check_relay_units(
    vm: &Vm,
    key: &Path,
    e: &Expect,
    wg: &crate::config::plan::WgPlan,
    out: &mut Vec<Check>,
) -> anyhow::Result<()> {
    use crate::config::plan::HubRef;
    use crate::config::profile::HubTransport;
    let i = e.plan.index_of(&e.node.name);
    let transport = i.and_then(|i| wg.hub_transport.get(i).copied());
    let unit = if transport.is_some_and(|t| t != HubTransport::Udp) {
        "kiln-relay.service"
    } else if wg.uses_relay() && i.is_some_and(|i| wg.hub == Some(HubRef::Node(i))) {
        "kiln-relay-server.service"
    } else {
        return Ok(());
    };
    let seen = vm.sh(
        key,
        &format!("systemctl is-active {unit}; /usr/lib/kiln/kiln-relay --version"),
    )?;
    let want = format!("active\nkiln-relay {}", env!("CARGO_PKG_VERSION"));
    out.push(Check::eq(
        &format!("{unit} runs (hub over TCP)"),
        &want,
        seen.trim(),
    ));
    if transport == Some(HubTransport::Auto) {
        // Which transport kiln-wg-transport chose, for `kiln test`'s table.
        let state = crate::render::relay::TRANSPORT_STATE;
        let seen = vm.sh(
            key,
            &format!("for i in $(seq 15); do [ -s {state} ] && break; sleep 1; done; cat {state}"),
        )?;
        out.push(Check::new(
            "hub transport in use (kiln-wg-transport)",
            "udp or tcp",
            seen.trim(),
            matches!(seen.trim(), "udp" | "tcp"),
        ));
    }
    Ok(())
}

/// The live firewall is the rendered one; allowed ports connect, others do not.
fn check_firewall(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let plan = e.plan;
    let sh = |s: &str| vm.sh(key, s);
    // Firewall: the live table equals the rendered ruleset loaded in a
    // scratch network namespace of the same guest (same nft version).
    let ruleset = rendered(e.files, "/etc/nftables.conf");
    let o = vm.ssh_as(key, "root", "set -e; ip netns add kiln-check; trap 'ip netns del kiln-check' EXIT; cat > /run/kiln-check.nft; ip netns exec kiln-check nft -f /run/kiln-check.nft; ip netns exec kiln-check nft list table inet kiln", ruleset.as_bytes())?;
    let expected = if o.status.success() {
        String::from_utf8_lossy(&o.stdout).to_string()
    } else {
        format!(
            "(rendered ruleset did not load: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        )
    };
    let live = normalise_counters(&sh("nft list table inet kiln 2>&1 || true")?);
    let expected = normalise_counters(&expected);
    out.push(Check::new(
        "nft ruleset is the rendered one",
        format!("{} lines", expected.lines().count()),
        if live.trim() == expected.trim() {
            format!("{} lines, identical", live.lines().count())
        } else {
            format!("differs: {}", first_difference(&expected, &live))
        },
        live.trim() == expected.trim(),
    ));
    if let Some(p) = vm.host_port(22) {
        let g = greeting(p);
        out.push(Check::new(
            "allowed port connects from outside (tcp/22)",
            "SSH-2.0 banner",
            &g,
            g.starts_with("SSH-2.0"),
        ));
    }
    if let Some(p) = vm.host_port(PROBE_PORT)
        && !plan.firewall.allow_tcp.contains(&PROBE_PORT)
    {
        start_probe(vm, key, PROBE_PORT)?;
        let inside = sh(&format!(
            "for i in 1 2 3 4 5; do exec 3<>/dev/tcp/127.0.0.1/{PROBE_PORT} && head -1 <&3 && break; sleep 1; done"
        ))?;
        let g = greeting(p);
        out.push(Check::new(
            &format!("blocked port does not connect from outside (tcp/{PROBE_PORT})"),
            "no greeting (inside: kiln-probe)".to_string(),
            format!("{g} (inside: {})", inside.trim()),
            inside.trim() == "kiln-probe" && g != "kiln-probe",
        ));
    }
    Ok(())
}

/// k3s active, in order, with the rendered config and its data where it belongs.
fn check_k3s(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let plan = e.plan;
    let node = e.node;
    let sh = |s: &str| vm.sh(key, s);
    // k3s.
    out.push(Check::eq(
        "k3s unit active",
        "active",
        &sh("systemctl is-active k3s || true")?,
    ));
    let wg_unit = plan
        .wireguard
        .as_ref()
        .map(|w| format!("wg-quick@{}.service", w.interface));
    let units: Vec<String> = ["nftables.service".to_string()]
        .into_iter()
        .chain(wg_unit)
        .chain(["k3s.service".to_string()])
        .collect();
    let ts = sh(&format!(
        "for u in {}; do systemctl show -p ActiveEnterTimestampMonotonic --value $u; done",
        units.join(" ")
    ))?;
    let ts: Vec<u64> = ts.lines().map(|l| l.trim().parse().unwrap_or(0)).collect();
    let ordered =
        ts.len() == units.len() && ts.iter().all(|t| *t > 0) && ts.windows(2).all(|w| w[0] <= w[1]);
    out.push(Check::new(
        "k3s started after nftables and WireGuard",
        units.join(" < "),
        ts.iter()
            .map(|t| format!("{:.2}s", *t as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(" < "),
        ordered,
    ));
    out.push(Check::eq(
        "k3s config.yaml",
        &rendered(e.files, "/etc/rancher/k3s/config.yaml"),
        &sh("cat /etc/rancher/k3s/config.yaml")?,
    ));
    let (state_name, state_dev) = match e.medium {
        Medium::Disk | Medium::Net { disk: true, .. } => (
            "k3s data is on the state partition",
            // The boot disk's: another disk may carry a kiln state partition too.
            sh(
                "d=$(cat /run/kiln/disk); for u in /sys/block/$d/$d*/uevent; do grep -qx PARTNAME=state $u && basename $(dirname $u); done",
            )?,
        ),
        Medium::Net { disk: false, .. } => ("k3s data is in RAM (diskless)", "tmpfs".to_string()),
    };
    let data = sh(
        "mkdir -p /var/lib/rancher/k3s && basename $(findmnt -no SOURCE -T /var/lib/rancher/k3s)",
    )?;
    out.push(Check::eq(state_name, state_dev.trim(), &data));
    if !e.real_k3s {
        let verb = node.role.as_str();
        let rec = sh(&format!(
            "cat /var/lib/rancher/k3s/double/{verb} 2>&1 || true"
        ))?;
        let want = format!(
            "verb={verb} version={} node-ip={}",
            plan.k3s.version,
            plan.cluster_address(node)
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        let get = |k: &str| {
            rec.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_string()
        };
        let seen = format!(
            "verb={} version={} node-ip={}",
            get("verb"),
            get("version"),
            get("config.node-ip")
        );
        out.push(Check::eq(
            "k3s (test double) runs with the rendered config",
            &want,
            &seen,
        ));
    }
    Ok(())
}

/// The state partition reaches the end of the (enlarged) disk.
fn check_state_fill(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let sh = |s: &str| vm.sh(key, s);
    // State partition fills the disk.
    if !matches!(e.medium, Medium::Net { disk: false, .. }) {
        let fill = sh(
            "d=$(basename $(findmnt -no SOURCE /var)); p=$(basename $(readlink -f /sys/class/block/$d/..)); echo $(( $(cat /sys/class/block/$p/size) - $(cat /sys/class/block/$d/start) - $(cat /sys/class/block/$d/size) ))",
        )?;
        let gap: i64 = fill.trim().parse().unwrap_or(-1);
        // The backup GPT (33 sectors) and sfdisk's 1 MiB alignment may remain.
        out.push(Check::new(
            "state partition reaches the end of the disk",
            "≤ 2081 sectors left",
            format!("{gap} sectors left"),
            (0..=2081).contains(&gap),
        ));
    }
    check_boot_disk(vm, key, e, out)?;
    check_stay_awake(vm, key, e, out)?;
    check_node_secrets(vm, key, e, out)
}

/// The node's k3s node password and SSH host key are the ones kiln keeps
/// in the state dir and seeded (compared by sha256: the table is printed).
/// The host key is the one sshd presents, read from outside.
fn check_node_secrets(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let sha = |s: &str| hex::encode(Sha256::digest(s.as_bytes()));
    let want = format!(
        "600 {}",
        sha(&rendered(e.files, "/etc/rancher/node/password"))
    );
    let seen = vm.sh(
        key,
        "p=/etc/rancher/node/password; [ -L /etc/rancher/node ] && echo symlink; echo $(stat -c %a $p) $(sha256sum < $p | cut -d' ' -f1)",
    )?;
    out.push(Check::eq(
        "k3s node password is the seeded one (sha256)",
        &want,
        seen.trim(),
    ));
    let pubkey = rendered(e.files, "/etc/ssh/ssh_host_ed25519_key.pub");
    let want: Vec<&str> = pubkey.split_whitespace().take(2).collect();
    let scan = crate::util::tool::Tool::new("ssh-keyscan", "openssh-client")
        .command()
        .and_then(|mut c| {
            crate::util::tool::run(
                c.args(["-t", "ed25519", "-p"])
                    .arg(vm.ssh_port().to_string())
                    .arg("127.0.0.1"),
            )
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_else(|e| e.to_string());
    let seen: Vec<&str> = scan
        .lines()
        .find(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().skip(1).take(2).collect())
        .unwrap_or_default();
    out.push(Check::new(
        "sshd presents the seeded host key",
        want.join(" "),
        seen.join(" "),
        !want.is_empty() && want == seen,
    ));
    Ok(())
}

/// Sleep targets masked and the lid ignored, as logind itself reports it
/// (unless the node allows suspend).
fn check_stay_awake(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let targets = "sleep.target suspend.target hibernate.target hybrid-sleep.target suspend-then-hibernate.target";
    let seen = vm.sh(key, &format!("systemctl is-enabled {targets} | sort | uniq -c | xargs; busctl get-property org.freedesktop.login1 /org/freedesktop/login1 org.freedesktop.login1.Manager HandleLidSwitch"))?;
    let seen = seen.split_whitespace().collect::<Vec<_>>().join(" ");
    let (want, pass) = if e.node.allow_suspend {
        (
            "sleep targets not masked, lid switch suspends",
            !seen.contains("masked") && seen.ends_with("s \"suspend\""),
        )
    } else {
        ("5 masked s \"ignore\"", seen == "5 masked s \"ignore\"")
    };
    out.push(Check::new(
        "sleep masked and lid switch ignored (laptops stay up)",
        want,
        seen,
        pass,
    ));
    Ok(())
}

/// Root and `/var` come from the disk the node booted from (the one
/// kiln's init recorded in /run/kiln/disk), never from another disk.
fn check_boot_disk(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let disk_of = |mount: &str| {
        format!(
            "basename $(readlink -f /sys/class/block/$(basename $(findmnt -no SOURCE {mount}))/..)"
        )
    };
    let (mounts, want): (&[&str], &str) = match e.medium {
        Medium::Disk => (&["/", "/var"], "root and /var on it"),
        Medium::Net { disk: true, .. } => (&["/var"], "/var on it"),
        Medium::Net { disk: false, .. } => return Ok(()),
    };
    let script: Vec<String> = mounts.iter().map(|m| disk_of(m)).collect();
    let seen = vm.sh(key, &format!("cat /run/kiln/disk; {}", script.join("; ")))?;
    let words: Vec<&str> = seen.split_whitespace().collect();
    out.push(Check::new(
        "root and /var are on the disk the node booted from",
        format!("/run/kiln/disk names a disk, {want}"),
        words.join(" "),
        words.len() == mounts.len() + 1 && words.iter().all(|w| *w == words[0]),
    ));
    Ok(())
}

/// `counter packets 12 bytes 720` → `counter`: the live table counts.
fn normalise_counters(ruleset: &str) -> String {
    ruleset
        .lines()
        .map(|l| match l.find("counter packets ") {
            Some(i) => {
                let rest = &l[i + "counter packets ".len()..];
                let after: Vec<&str> = rest.splitn(4, ' ').collect();
                // after = [N, "bytes", M, rest…]
                format!("{}counter {}", &l[..i], after.get(3).copied().unwrap_or(""))
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn first_difference(a: &str, b: &str) -> String {
    for (x, y) in a.lines().zip(b.lines()) {
        if x.trim() != y.trim() {
            return format!("expected `{}`, saw `{}`", x.trim(), y.trim());
        }
    }
    format!("{} vs {} lines", a.lines().count(), b.lines().count())
}

/// A file kiln writes before the reboot and reads after it.
const PERSIST_FILE: &str = "/var/lib/kiln-check/persist";

/// How to boot for the checks.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Reboot once and run the second-boot checks.
    pub reboot: bool,
    /// Bytes added to the disk (the state partition must grow into them).
    pub grow_bytes: u64,
    /// Give the VM this node's NIC (MAC, LAN address) instead of the
    /// expected node's: for an image of another node.
    pub boot_as: Option<NodePlan>,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            reboot: true,
            grow_bytes: 2 * 1024 * 1024 * 1024,
            boot_as: None,
        }
    }
}

/// Boot a node image, run every check, reboot, run the checks that need a
/// second boot, and power off.
pub fn test_node(
    image: &Path,
    key: &Path,
    e: &Expect,
    log: Option<&Path>,
) -> anyhow::Result<Report> {
    test_node_with(image, key, e, log, &BootOptions::default())
}

pub fn test_node_with(
    image: &Path,
    key: &Path,
    e: &Expect,
    log: Option<&Path>,
    opts: &BootOptions,
) -> anyhow::Result<Report> {
    let mut cfg = VmConfig::new(&e.node.name, image);
    if opts.grow_bytes > 0 {
        let size = fs_err::metadata(image)?.len();
        cfg.disk_bytes = Some(size + opts.grow_bytes);
    }
    use_nic_of(&mut cfg, opts.boot_as.as_ref().unwrap_or(e.node));
    test_node_on(&cfg, key, e, log, opts.reboot)
}

/// As [`test_node_with`], on a machine the caller describes (its disks,
/// buses and NIC; its MAC and address should be the node's, see
/// [`use_nic_of`]).
pub fn test_node_on(
    cfg: &VmConfig,
    key: &Path,
    e: &Expect,
    log: Option<&Path>,
    reboot: bool,
) -> anyhow::Result<Report> {
    let mut cfg = cfg.clone();
    cfg.forward.push(PROBE_PORT);
    let mut vm = start_and_settle(&cfg, key, log)?;
    let mut report = Report {
        node: e.node.name.clone(),
        ..Report::default()
    };
    report.timeline = timeline(&vm, key, 0);
    report.checks = checks_first_boot(&vm, key, e)?;
    if !reboot {
        let _ = vm.ssh_as(key, "root", "systemctl poweroff", b"");
        let _ = vm.wait_exit(Duration::from_secs(120));
        return Ok(report);
    }
    let marker_before = vm.sh(key, "cat /var/lib/kiln/run-once.done 2>&1")?;
    let ca_before = crate::verify::cluster_ca::ca_listing(&vm, key)?;
    let manifests_before = crate::verify::manifests::manifest_listing(&vm, key)?;
    let initiator_before = crate::verify::storage::initiator_name(&vm, key)?;
    vm.sh(
        key,
        &format!("mkdir -p $(dirname {PERSIST_FILE}) && echo kiln-check > {PERSIST_FILE} && sync"),
    )?;

    // Second boot.
    let _ = vm.ssh_as(key, "root", "systemctl reboot", b"");
    vm.wait_serial("kiln-init: switch_root", 1, BOOT_TIMEOUT)?;
    vm.wait_ssh(key, BOOT_TIMEOUT)?;
    let _ = vm.wait_until("kiln-firstboot to finish", Duration::from_secs(120), |vm| {
        Ok(vm
            .sh(key, "systemctl is-active kiln-firstboot")
            .ok()
            .filter(|s| s.trim() == "active"))
    });
    report.checks.push(Check::eq(
        "a file under /var survives a reboot",
        "kiln-check",
        &vm.sh(key, &format!("cat {PERSIST_FILE} 2>&1"))?,
    ));
    if crate::config::cluster_ca::seeds_ca(e.plan, e.node) {
        report.checks.push(Check::eq(
            "the cluster CA in server/tls is unchanged after a reboot",
            &ca_before,
            &crate::verify::cluster_ca::ca_listing(&vm, key)?,
        ));
    }
    report.checks.push(Check::eq(
        "k3s's manifests from kiln are unchanged after a reboot",
        &manifests_before,
        &crate::verify::manifests::manifest_listing(&vm, key)?,
    ));
    if crate::render::storage::needs_iscsi(e.node) {
        let after = crate::verify::storage::initiator_name(&vm, key)?;
        report.checks.push(Check::new(
            "the iSCSI initiator name is unchanged after a reboot",
            &initiator_before,
            &after,
            !after.is_empty() && after == initiator_before,
        ));
    }
    let marker_after = vm.sh(key, "cat /var/lib/kiln/run-once.done 2>&1")?;
    let second = vm.sh(key, "journalctl -b 0 -u kiln-firstboot --no-pager -o cat | grep -c 'run-once commands already ran' || true")?;
    report.checks.push(Check::new(
        "run-once commands ran exactly once",
        format!(
            "marker {} kept; second boot skips them",
            marker_before.trim()
        ),
        format!(
            "marker {}; skipped on boot 2: {}",
            marker_after.trim(),
            second.trim()
        ),
        marker_before == marker_after
            && !marker_before.contains("No such file")
            && second.trim() == "1",
    ));
    let n = e.plan.first_boot.boot_cmd.len();
    if n > 0 {
        let counts = vm.sh(key, "for b in -1 0; do journalctl -b $b -u kiln-firstboot --no-pager -o cat | grep -c '^kiln-firstboot: boot-cmd:' || true; done")?;
        let counts: Vec<&str> = counts.lines().collect();
        out_push_eq(
            &mut report,
            "boot commands ran on each boot",
            &format!("{n} {n}"),
            &counts.join(" "),
        );
    }
    let _ = vm.ssh_as(key, "root", "systemctl poweroff", b"");
    let _ = vm.wait_exit(Duration::from_secs(120));
    Ok(report)
}

/// The console line kiln's init prints when it runs without a disk.
pub const DISKLESS_LOG: &str = "no state partition: /var is in RAM";

/// A netbooting VM for node `e.node`: the node's MAC and LAN address on
/// QEMU user networking, whose DHCP/TFTP hands out `net`; no disk unless
/// the caller sets `image` (the NIC boots first either way).
pub fn netboot_vm(e: &Expect, net: &crate::verify::vm::NetBoot) -> VmConfig {
    let mut cfg = VmConfig::diskless(&e.node.name);
    cfg.netboot = Some(net.clone());
    cfg.forward = vec![PROBE_PORT];
    use_nic_of(&mut cfg, e.node);
    cfg
}

/// Give the VM `node`'s NIC: its MAC, and its static LAN address (QEMU's
/// user network then uses that subnet; the host is its .2).
pub fn use_nic_of(cfg: &mut VmConfig, node: &NodePlan) {
    if let Some(mac) = node.mac {
        cfg.mac = mac.to_string();
    }
    if let Some(a) = node.network.address {
        cfg.user_net = Some((a.trunc(), a.addr()));
    }
}

/// Start the VM and wait for the first boot to settle: switch_root, SSH,
/// and k3s (or its double) active if it gets there within 2 minutes.
fn start_and_settle(cfg: &VmConfig, key: &Path, log: Option<&Path>) -> anyhow::Result<Vm> {
    let mut vm = Vm::start(cfg)?;
    if let Some(l) = log {
        vm.keep_log(l);
    }
    vm.wait_serial("kiln-init: switch_root", 0, BOOT_TIMEOUT)?;
    vm.wait_ssh(key, BOOT_TIMEOUT)?;
    let _ = vm.wait_until("k3s to become active", Duration::from_secs(120), |vm| {
        Ok(vm
            .sh(key, "systemctl is-active k3s")
            .ok()
            .filter(|s| s.trim() == "active"))
    });
    Ok(vm)
}

/// Netboot a node (iPXE → `kiln serve` → root image into RAM), with
/// `disk` attached if given, and run the checks that apply.
pub fn test_netboot(
    net: &crate::verify::vm::NetBoot,
    disk: Option<&Path>,
    key: &Path,
    e: &Expect,
    log: Option<&Path>,
) -> anyhow::Result<Report> {
    let mut cfg = netboot_vm(e, net);
    cfg.image = disk.map(Path::to_path_buf);
    let mut vm = start_and_settle(&cfg, key, log)?;
    let mut report = Report {
        node: e.node.name.clone(),
        ..Report::default()
    };
    report.timeline = timeline(&vm, key, 0);
    let at = |needle: &str| vm.serial_find(needle, 0).map(|l| l.at.as_secs_f64());
    report.timeline.insert(
        1,
        Mark {
            what: "iPXE runs kiln's script".into(),
            at: at("kiln: booting"),
        },
    );
    report.timeline.insert(
        4,
        Mark {
            what: "root fetched, verified".into(),
            at: at("kiln-init: root image sha256 verified"),
        },
    );
    report.checks = checks_first_boot(&vm, key, e)?;
    let diskless = matches!(e.medium, Medium::Net { disk: false, .. });
    let said = vm
        .serial_find(DISKLESS_LOG, 0)
        .map(|l| l.text)
        .unwrap_or_else(|| "(not in the boot log)".into());
    report.checks.push(Check::new(
        if diskless {
            "the boot log says /var is in RAM"
        } else {
            "the boot log does not say /var is in RAM"
        },
        if diskless {
            DISKLESS_LOG
        } else {
            "(not in the boot log)"
        },
        said.trim(),
        said.contains(DISKLESS_LOG) == diskless,
    ));
    let _ = vm.ssh_as(key, "root", "systemctl poweroff", b"");
    let _ = vm.wait_exit(Duration::from_secs(120));
    Ok(report)
}

fn out_push_eq(r: &mut Report, name: &str, expected: &str, seen: &str) {
    r.checks.push(Check::eq(name, expected, seen));
}

/// The boot timeline of boot number `nth` (0-based) from the console and
/// the guest's own clock for the k3s unit.
pub fn timeline(vm: &Vm, key: &Path, nth: usize) -> Vec<Mark> {
    let at = |needle: &str| vm.serial_find(needle, nth).map(|l| l.at.as_secs_f64());
    let kernel = at("Linux version");
    let k3s = vm
        .sh(
            key,
            "systemctl show -p ActiveEnterTimestampMonotonic --value k3s",
        )
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|us| *us > 0.0)
        .and_then(|us| kernel.map(|k| k + us / 1e6));
    vec![
        Mark {
            what: "QEMU started".into(),
            at: Some(0.0),
        },
        Mark {
            what: "kernel started".into(),
            at: kernel,
        },
        Mark {
            what: "kiln-init started".into(),
            at: at("kiln-init: started"),
        },
        Mark {
            what: "switch_root".into(),
            at: at("kiln-init: switch_root"),
        },
        Mark {
            what: "k3s unit active".into(),
            at: k3s,
        },
    ]
}

/// Make an ed25519 key pair for test access (private key 0600).
pub fn make_test_key(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let key = dir.join("kiln-test-access");
    crate::util::tool::run(
        crate::util::tool::Tool::new("ssh-keygen", "openssh-client")
            .command()?
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "kiln-test-access",
                "-f",
            ])
            .arg(&key),
    )?;
    let public = fs_err::read_to_string(key.with_extension("pub"))
        .with_context(|| "reading the test key")?;
    Ok((key, public.trim().to_string()))
}

/// One node of a multi-node boot.
pub struct ClusterNode<'a> {
    pub image: &'a Path,
    pub node: &'a NodePlan,
    /// MAC of the management NIC (user networking, SSH).
    pub mgmt_mac: String,
    /// UDP ports forwarded onto the management NIC (see
    /// [`VmConfig::udp_forward`]).
    pub udp_forward: Vec<(std::net::SocketAddr, u16)>,
}

/// Boot a server and an agent of one profile on a shared virtual LAN and
/// check the tunnel, the firewall between them and the agent's join.
pub fn test_cluster(
    plan: &Plan,
    server: &ClusterNode,
    agent: &ClusterNode,
    key: &Path,
    real_k3s: bool,
    logs: Option<&Path>,
) -> anyhow::Result<Report> {
    test_cluster_then(plan, (server, agent), key, real_k3s, logs, |_, _, _| Ok(()))
}

/// As [`test_cluster`]; then `more` adds its own checks, on the two
/// machines still running (server first).
pub fn test_cluster_then(
    plan: &Plan,
    (server, agent): (&ClusterNode, &ClusterNode),
    key: &Path,
    real_k3s: bool,
    logs: Option<&Path>,
    more: impl FnOnce(&Vm, &Vm, &mut Report) -> anyhow::Result<()>,
) -> anyhow::Result<Report> {
    let (mut s, mut a) = boot_pair(server, agent, key, logs)?;
    let mut r = Report {
        node: format!("{}+{}", server.node.name, agent.node.name),
        ..Report::default()
    };
    let wg = plan
        .wireguard
        .as_ref()
        .context("the multi-node check needs WireGuard in the profile")?;
    let s_wg = server
        .node
        .wireguard_address
        .expect("validated")
        .to_string();
    let a_wg = agent.node.wireguard_address.expect("validated").to_string();
    let s_lan = server
        .node
        .lan_address
        .context("the server needs a LAN address")?
        .to_string();

    check_tunnel(&s, &a, server, agent, key, wg, (&s_wg, &a_wg), &mut r)?;
    check_tunnel_over_tcp(plan, (&s, &a), agent, key, wg, &mut r)?;
    check_api_reach(&a, server, agent, key, (&s_wg, &s_lan), &mut r);
    check_agent_joins(plan, &mut s, &mut a, server, agent, key, real_k3s, &mut r)?;
    check_distinct_initiators((&s, &a), (server, agent), key, &mut r)?;
    more(&s, &a, &mut r)?;
    r.timeline = vec![
        Mark {
            what: format!("{} switch_root", server.node.name),
            at: s
                .serial_find("kiln-init: switch_root", 0)
                .map(|l| l.at.as_secs_f64()),
        },
        Mark {
            what: format!("{} switch_root", agent.node.name),
            at: a
                .serial_find("kiln-init: switch_root", 0)
                .map(|l| l.at.as_secs_f64()),
        },
    ];
    Ok(r)
}

/// With iSCSI on both nodes, each has an initiator name of its own:
/// made on the node, not in the image or the seed they were built from.
fn check_distinct_initiators(
    (s, a): (&Vm, &Vm),
    (server, agent): (&ClusterNode, &ClusterNode),
    key: &Path,
    r: &mut Report,
) -> anyhow::Result<()> {
    use crate::render::storage::needs_iscsi;
    use crate::verify::storage::{initiator_name, is_iqn};
    if !(needs_iscsi(server.node) && needs_iscsi(agent.node)) {
        return Ok(());
    }
    let (sn, an) = (initiator_name(s, key)?, initiator_name(a, key)?);
    r.checks.push(Check::new(
        &format!(
            "{} and {} have distinct iSCSI initiator names",
            server.node.name, agent.node.name
        ),
        "two different iqn names",
        format!("{sn} / {an}"),
        is_iqn(&sn) && is_iqn(&an) && sn != an,
    ));
    Ok(())
}

/// Boot the server and the agent on one virtual LAN; both answer SSH.
fn boot_pair(
    server: &ClusterNode,
    agent: &ClusterNode,
    key: &Path,
    logs: Option<&Path>,
) -> anyhow::Result<(Vm, Vm)> {
    let port = crate::verify::vm::free_port()?;
    let start = |n: &ClusterNode, lan: crate::verify::vm::Lan| -> anyhow::Result<Vm> {
        let mut cfg = VmConfig::new(&n.node.name, n.image);
        cfg.mac = n.mgmt_mac.clone();
        cfg.udp_forward = n.udp_forward.clone();
        cfg.lan = Some((
            lan,
            n.node
                .mac
                .context("multi-node tests need a MAC per node")?
                .to_string(),
        ));
        let mut vm = Vm::start(&cfg)?;
        if let Some(d) = logs {
            vm.keep_log(&d.join(format!("{}.console.log", n.node.name)));
        }
        Ok(vm)
    };
    let mut s = start(server, crate::verify::vm::Lan::Listen(port))?;
    // The listening side must be up before the other connects.
    std::thread::sleep(Duration::from_millis(500));
    let mut a = start(agent, crate::verify::vm::Lan::Connect(port))?;
    s.wait_ssh(key, BOOT_TIMEOUT)?;
    a.wait_ssh(key, BOOT_TIMEOUT)?;
    Ok((s, a))
}

/// Both ways over the tunnel, and a completed handshake.
#[allow(clippy::too_many_arguments)]
fn check_tunnel(
    s: &Vm,
    a: &Vm,
    server: &ClusterNode,
    agent: &ClusterNode,
    key: &Path,
    wg: &crate::config::plan::WgPlan,
    (s_wg, a_wg): (&str, &str),
    r: &mut Report,
) -> anyhow::Result<()> {
    // Tunnel: ping both ways (busybox ping: minbase has no iputils).
    let ping = |vm: &Vm, to: &str| {
        vm.sh(key, &format!("for i in $(seq 30); do busybox ping -c 1 -W 1 {to} >/dev/null 2>&1 && echo ok && exit 0; sleep 1; done; echo no reply")).unwrap_or_else(|e| e.to_string())
    };
    r.checks.push(Check::eq(
        &format!(
            "{} pings {} over the tunnel",
            agent.node.name, server.node.name
        ),
        "ok",
        &ping(a, s_wg),
    ));
    r.checks.push(Check::eq(
        &format!(
            "{} pings {} over the tunnel",
            server.node.name, agent.node.name
        ),
        "ok",
        &ping(s, a_wg),
    ));
    let hs = a.sh(
        key,
        &format!(
            "wg show {} latest-handshakes | awk '{{print $2}}'",
            wg.interface
        ),
    )?;
    let hs_ok = hs
        .lines()
        .next()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .is_some_and(|t| t > 0);
    r.checks.push(Check::new(
        "WireGuard handshake completed",
        "a handshake time",
        hs.trim(),
        hs_ok,
    ));

    Ok(())
}

/// With `hub-transport = "tcp"` the pings above went through kiln-relay:
/// the agent's hub endpoint is its relay client, and the hub's relay
/// server logged the agent's connection. With `"auto"` they went over
/// UDP, and the agent moves to the relay once the hub drops UDP.
fn check_tunnel_over_tcp(
    plan: &Plan,
    (s, a): (&Vm, &Vm),
    agent: &ClusterNode,
    key: &Path,
    wg: &crate::config::plan::WgPlan,
    r: &mut Report,
) -> anyhow::Result<()> {
    use crate::config::profile::HubTransport;
    let i = plan.index_of(&agent.node.name);
    match i.and_then(|i| wg.hub_transport.get(i).copied()) {
        Some(HubTransport::Tcp) => {
            check_on_relay(s, a, agent, key, wg, r)?;
            drop_udp_to_hub(s, key, wg)?;
            let seen = ping_hub(s, a, key, wg);
            undrop_udp(s, key, wg, seen, r)
        }
        Some(HubTransport::Auto) => check_switch_to_tcp(s, a, agent, key, wg, r),
        _ => Ok(()),
    }
}

/// The agent's hub endpoint is its relay client, and the hub's relay
/// server logged a connection.
fn check_on_relay(
    s: &Vm,
    a: &Vm,
    agent: &ClusterNode,
    key: &Path,
    wg: &crate::config::plan::WgPlan,
    r: &mut Report,
) -> anyhow::Result<()> {
    let local = format!("127.0.0.1:{}", crate::config::plan::RELAY_LOCAL_PORT);
    let endpoints = a.sh(
        key,
        &format!("wg show {} endpoints | awk '{{print $2}}'", wg.interface),
    )?;
    r.checks.push(Check::new(
        &format!("{} dials the hub through kiln-relay", agent.node.name),
        &local,
        endpoints.trim(),
        endpoints.lines().any(|l| l.trim() == local),
    ));
    let served = s.sh(
        key,
        "journalctl -b -u kiln-relay-server.service -o cat | grep -c ' connected$' || true",
    )?;
    r.checks.push(Check::new(
        "the hub's kiln-relay served a connection",
        "at least 1",
        served.trim(),
        served.trim().parse::<u32>().is_ok_and(|n| n >= 1),
    ));
    Ok(())
}

/// `"auto"`: the agent starts on UDP; while the hub drops UDP to its
/// tunnel port, kiln-wg-transport (as shipped: three probes of three pings
/// ten seconds apart) moves the hub's endpoint to kiln-relay, and the
/// tunnel carries on over TCP. The agent stays there (it tries UDP again
/// after five minutes, longer than this test waits).
fn check_switch_to_tcp(
    s: &Vm,
    a: &Vm,
    agent: &ClusterNode,
    key: &Path,
    wg: &crate::config::plan::WgPlan,
    r: &mut Report,
) -> anyhow::Result<()> {
    let state = crate::render::relay::TRANSPORT_STATE;
    let before = a.sh(key, &format!("cat {state}"))?;
    r.checks.push(Check::eq(
        "hub-transport auto: the agent starts on udp",
        "udp",
        before.trim(),
    ));
    drop_udp_to_hub(s, key, wg)?;
    let started = std::time::Instant::now();
    let after = a.sh(
        key,
        &format!("for i in $(seq 150); do [ \"$(cat {state})\" = tcp ] && break; sleep 1; done; cat {state}"),
    )?;
    r.checks.push(Check::eq(
        &format!(
            "kiln-wg-transport switches to tcp while the hub drops udp (after {:.0} s)",
            started.elapsed().as_secs_f64()
        ),
        "tcp",
        after.trim(),
    ));
    let logged = a.sh(
        key,
        "journalctl -b -u kiln-wg-transport.service -o cat | grep 'switched to tcp' || true",
    )?;
    r.checks.push(Check::new(
        "kiln-wg-transport logged the switch",
        "kiln-wg-transport: switched to tcp: …",
        logged.lines().next().unwrap_or("nothing"),
        logged.contains("kiln-wg-transport: switched to tcp"),
    ));
    let seen = ping_hub(s, a, key, wg);
    check_on_relay(s, a, agent, key, wg, r)?;
    undrop_udp(s, key, wg, seen, r)
}

/// The hub drops every UDP packet from the network (not its own relay,
/// which hands packets over on loopback) to its tunnel port: a table of
/// its own, removed by [`undrop_udp`].
fn drop_udp_to_hub(s: &Vm, key: &Path, wg: &crate::config::plan::WgPlan) -> anyhow::Result<()> {
    let port = wg.listen_port;
    s.sh(key, &format!("nft add table inet kiln_test_no_udp && nft add chain inet kiln_test_no_udp input '{{ type filter hook input priority -10; }}' && nft add rule inet kiln_test_no_udp input iifname != lo udp dport {port} counter drop"))?;
    Ok(())
}

/// Whether the agent pings the hub's tunnel address (within 10 s):
/// `ok`, `no reply`, or the error.
fn ping_hub(s: &Vm, a: &Vm, key: &Path, wg: &crate::config::plan::WgPlan) -> String {
    let ping = || -> anyhow::Result<String> {
        let hub = s.sh(
            key,
            &format!(
                "ip -o -4 addr show dev {} | awk '{{print $4}}' | cut -d/ -f1",
                wg.interface
            ),
        )?;
        a.sh(key, &format!("for i in $(seq 10); do busybox ping -c 1 -W 1 {} >/dev/null 2>&1 && echo ok && exit 0; sleep 1; done; echo no reply", hub.trim()))
    };
    ping().unwrap_or_else(|e| format!("{e:#}"))
}

/// Remove the table of [`drop_udp_to_hub`]: the ping `seen` while it was
/// there went through the tunnel without UDP between agent and hub.
fn undrop_udp(
    s: &Vm,
    key: &Path,
    wg: &crate::config::plan::WgPlan,
    seen: String,
    r: &mut Report,
) -> anyhow::Result<()> {
    let dropped = s.sh(key, "nft list table inet kiln_test_no_udp | grep -o 'packets [0-9]*'; nft delete table inet kiln_test_no_udp")?;
    r.checks.push(Check::eq(
        &format!(
            "the agent pings the hub with UDP to port {} dropped ({})",
            wg.listen_port,
            dropped.trim()
        ),
        "ok",
        seen.trim(),
    ));
    Ok(())
}

/// The server's API port: reachable over the tunnel, not over the LAN.
fn check_api_reach(
    a: &Vm,
    server: &ClusterNode,
    agent: &ClusterNode,
    key: &Path,
    (s_wg, s_lan): (&str, &str),
    r: &mut Report,
) {
    // Firewall between the nodes: 6443 over the tunnel, not over the LAN.
    let connect = |vm: &Vm, host: &str| {
        vm.sh(key, &format!("timeout 5 bash -c '</dev/tcp/{host}/{}' 2>/dev/null && echo connects || echo refused", crate::config::plan::K3S_API_PORT)).unwrap_or_else(|e| e.to_string())
    };
    r.checks.push(Check::eq(
        &format!(
            "{} reaches {}:6443 over WireGuard",
            agent.node.name, server.node.name
        ),
        "connects",
        &connect(a, s_wg),
    ));
    r.checks.push(Check::eq(
        &format!(
            "{} cannot reach {}:6443 over the LAN",
            agent.node.name, server.node.name
        ),
        "refused",
        &connect(a, s_lan),
    ));
}

/// The agent's k3s points at the server's tunnel address and gets
/// through (both nodes Ready with a real k3s).
#[allow(clippy::too_many_arguments)]
fn check_agent_joins(
    plan: &Plan,
    s: &mut Vm,
    a: &mut Vm,
    server: &ClusterNode,
    agent: &ClusterNode,
    key: &Path,
    real_k3s: bool,
    r: &mut Report,
) -> anyhow::Result<()> {
    // The agent joins the server's tunnel address.
    let want = plan.join_url(agent.node).unwrap_or_default();
    let conf = a.sh(
        key,
        "sed -n 's/^server: *//p' /etc/rancher/k3s/config.yaml | tr -d '\"'",
    )?;
    r.checks
        .push(Check::eq("agent's k3s server URL", &want, &conf));
    if real_k3s {
        let names = format!("{} {}", server.node.name, agent.node.name);
        let seen = s
            .wait_until("both nodes Ready", Duration::from_secs(600), |vm| {
                let out = vm.sh(key, "k3s kubectl get nodes --no-headers 2>/dev/null | awk '$2==\"Ready\"{print $1}' | sort | xargs").unwrap_or_default();
                Ok(Some(out.trim().to_string()).filter(|o| o.split_whitespace().count() >= 2))
            })
            .unwrap_or_else(|e| e.to_string());
        let mut want: Vec<&str> = names.split(' ').collect();
        want.sort();
        r.checks.push(Check::eq(
            "k3s kubectl get nodes: both Ready",
            &want.join(" "),
            &seen,
        ));
    } else {
        let host = want.trim_start_matches("https://").to_string();
        let seen = a
            .wait_until(
                "the agent double to connect",
                Duration::from_secs(120),
                |vm| {
                    let rec = vm
                        .sh(
                            key,
                            "cat /var/lib/rancher/k3s/double/agent 2>/dev/null || true",
                        )
                        .unwrap_or_default();
                    let get = |k: &str| {
                        rec.lines()
                            .find_map(|l| l.strip_prefix(&format!("{k}=")))
                            .unwrap_or("")
                            .to_string()
                    };
                    Ok(Some(format!(
                        "server={} token={} connected={}",
                        get("server"),
                        get("token_form"),
                        get("connected")
                    ))
                    .filter(|s| s.ends_with("connected=true")))
                },
            )
            .unwrap_or_else(|e| e.to_string());
        r.checks.push(Check::eq(
            "agent (test double) checked the server's CA against its token and got through",
            &format!("server={host} token=secure connected=true"),
            &seen,
        ));
    }
    Ok(())
}
