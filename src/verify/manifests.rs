//! Checks of what k3s deploys and of its proxy, on a booted node: a
//! server has its manifests in `server/manifests` as regular files with
//! the image's bytes (k3s does not follow symlinks there), copied before
//! k3s started; an agent has none; k3s runs with the profile's proxy
//! environment (or none).
//!
//! [`crate::verify::checks`] runs them on every first boot (and compares
//! the listing across a reboot); with no manifests or proxy in the
//! profile they check that there are none.

use std::fmt::Write as _;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::config::plan::{NodePlan, Plan};
use crate::config::profile::Role;
use crate::render::manifests::{K3S_MANIFESTS_DIR, LIST, UNIT, node_manifests};
use crate::verify::report::{Check, Expect};
use crate::verify::vm::Vm;

/// The proxy variables kiln sets, as they appear in an environment.
const PROXY_VARS: [&str; 3] = ["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"];

/// `name sha256 type mode` for each `kiln-*.yaml` in k3s's manifests
/// directory on the node (`type` is `file`, `symlink` or `other`), in
/// byte order; empty when there are none.
pub fn manifest_listing(vm: &Vm, key: &Path) -> anyhow::Result<String> {
    vm.sh(
        key,
        &format!(
            "cd {K3S_MANIFESTS_DIR} 2>/dev/null || exit 0; for f in kiln-*.yaml; do [ -e \"$f\" ] || [ -L \"$f\" ] || continue; if [ -L \"$f\" ]; then t=symlink; elif [ -f \"$f\" ]; then t=file; else t=other; fi; echo \"$f $(sha256sum < \"$f\" | cut -c1-64) $t $(stat -c %a \"$f\")\"; done | LC_ALL=C sort"
        ),
    )
}

/// The listing `node` should show for `plan`: each manifest it deploys
/// as a regular 0600 file with the rendered bytes; nothing on an agent.
pub fn expected_manifest_listing(plan: &Plan, node: &NodePlan) -> String {
    let mut rows: Vec<(String, String)> = node_manifests(plan, node);
    rows.sort();
    let mut s = String::new();
    for (name, text) in rows {
        let _ = writeln!(s, "{name} {} file 600", hex::encode(Sha256::digest(&text)));
    }
    s
}

/// On a server: kiln's manifests in place as regular files with the
/// expected sha256, and the unit done before k3s started. On an agent:
/// no manifest list in the seed and no kiln manifest on disk.
pub fn check_manifests(
    vm: &Vm,
    key: &Path,
    e: &Expect,
    out: &mut Vec<Check>,
) -> anyhow::Result<()> {
    let listing = manifest_listing(vm, key)?;
    if e.node.role == Role::Agent {
        out.push(Check::eq("no kiln manifests on an agent", "", &listing));
        let list = vm.sh(
            key,
            &format!("test -e {LIST} && echo present || echo absent"),
        )?;
        out.push(Check::eq(
            "no manifest list in an agent's seed",
            "absent",
            &list,
        ));
        return Ok(());
    }
    out.push(Check::eq(
        &format!("kiln's manifests in {K3S_MANIFESTS_DIR}: regular files, sha256, mode"),
        &expected_manifest_listing(e.plan, e.node),
        &listing,
    ));
    // Monotonic microseconds: the unit's exit, then k3s's start.
    let times = vm.sh(
        key,
        &format!(
            "echo $(systemctl show -p ActiveState --value {UNIT}) $(systemctl show -p ExecMainExitTimestampMonotonic --value {UNIT}) $(systemctl show -p ExecMainStartTimestampMonotonic --value k3s.service)"
        ),
    )?;
    let mut f = times.split_whitespace();
    let state = f.next().unwrap_or("");
    let (done, k3s) = (num(f.next()), num(f.next()));
    out.push(Check::new(
        &format!("{UNIT} done before k3s started"),
        "active, exited before k3s's start",
        times.trim(),
        state == "active" && done > 0 && k3s > 0 && done <= k3s,
    ));
    Ok(())
}

fn num(s: Option<&str>) -> u64 {
    s.and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The proxy lines k3s's environment should hold (sorted), from the
/// rendered environment file; empty without `[k3s.proxy]`.
pub fn expected_proxy_environment(plan: &Plan) -> String {
    let mut lines: Vec<&str> = Vec::new();
    let text = crate::render::proxy::env_file(plan).unwrap_or_default();
    lines.extend(
        text.lines()
            .filter(|l| PROXY_VARS.iter().any(|v| l.starts_with(&format!("{v}=")))),
    );
    lines.sort_unstable();
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// The proxy variables in the environment of k3s's main process, sorted.
pub fn proxy_environment(vm: &Vm, key: &Path) -> anyhow::Result<String> {
    vm.sh(
        key,
        "pid=$(systemctl show -p MainPID --value k3s.service); [ \"$pid\" != 0 ] || { echo 'k3s is not running'; exit 0; }; tr '\\0' '\\n' < /proc/$pid/environ | grep -E '^(HTTP_PROXY|HTTPS_PROXY|NO_PROXY)=' | LC_ALL=C sort || true",
    )
}

/// k3s runs with the profile's proxy (and containerd, which it starts,
/// inherits it), or with no proxy variable at all.
pub fn check_proxy(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let name = if e.plan.proxy.is_some() {
        "k3s runs with the profile's HTTP_PROXY, HTTPS_PROXY, NO_PROXY"
    } else {
        "k3s runs without proxy variables"
    };
    out.push(Check::eq(
        name,
        &expected_proxy_environment(e.plan),
        &proxy_environment(vm, key)?,
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_come_from_the_rendered_files() {
        let text = "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\n[k3s.proxy]\nhttps = \"http://proxy:3128\"\n[[k3s.manifests]]\nname = \"ns\"\ncontent = \"apiVersion: v1\\nkind: Namespace\\n\"\n[[nodes]]\nname = \"s1\"\nrole = \"server\"\nlan-address = \"192.168.1.11\"\n[[nodes]]\nname = \"a1\"\nrole = \"agent\"\n";
        let plan = crate::config::plan::plan_profile(Path::new("lab.toml"), text)
            .unwrap_or_else(|e| panic!("{e}"));
        let s1 = expected_manifest_listing(&plan, plan.node("s1").unwrap());
        assert!(
            s1.starts_with("kiln-ns.yaml ") && s1.ends_with(" file 600\n"),
            "{s1}"
        );
        assert_eq!(
            expected_manifest_listing(&plan, plan.node("a1").unwrap()),
            ""
        );
        let env = expected_proxy_environment(&plan);
        assert_eq!(env.lines().count(), 2, "{env}");
        assert!(
            env.starts_with("HTTPS_PROXY=http://proxy:3128\nNO_PROXY=localhost,"),
            "{env}"
        );
    }
}
