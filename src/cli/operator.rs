//! `kiln operator`: write the `wg-quick` file an operator's laptop uses to
//! reach the cluster's SSH and API ports through the tunnel.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::config::plan::{HubRef, OperatorPlan, Plan};
use crate::config::profile::Topology;
use crate::config::secrets::ClusterSecrets;
use crate::render;
use crate::util::atomic::write_unless_changed;
use crate::util::mode::SECRET_FILE_MODE;

/// wg-quick takes the interface name from the file name (without
/// `.conf`), and accepts at most this many characters (IFNAMSIZ − 1).
pub const WG_QUICK_NAME_MAX: usize = 15;

/// What `kiln operator` was asked, as parsed by `main`.
#[derive(Debug, Clone, Default)]
pub struct OperatorArgs {
    /// The cluster profile (TOML).
    pub profile: PathBuf,
    /// The operator, as named in `[[operators]]`.
    pub name: String,
    /// The file to write [default: `<cluster>.conf` here].
    pub out: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// Replace an existing file with other content.
    pub force: bool,
}

/// Render the operator's file, write it 0600, print its path; on stderr
/// what it reaches and what an external hub's admin must add.
pub fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let (plan, secrets) =
        crate::config::secrets::load_with_secrets(&args.profile, args.state_dir.as_deref())?;
    let op = find_operator(&plan, &args.name)?;
    let out = match args.out {
        Some(p) => p,
        None => PathBuf::from(default_file_name(&plan.cluster)),
    };
    check_file_name(&out)?;
    let text = operator_config(&plan, &secrets, &args.name)?;
    write_config(&out, &text, args.force)?;
    println!("{}", out.display());
    eprint!("{}", next_steps(&plan, &secrets, op, &out));
    Ok(())
}

/// The operator's `wg-quick` file, for a plan and its secrets.
pub fn operator_config(
    plan: &Plan,
    secrets: &ClusterSecrets,
    name: &str,
) -> anyhow::Result<String> {
    let op = find_operator(plan, name)?;
    let private = secrets
        .operators
        .get(name)
        .with_context(|| format!("no key for operator `{name}` in the secrets"))?;
    Ok(render::render_operator(
        plan,
        op,
        private,
        &secrets.public_keys(),
    ))
}

fn find_operator<'p>(plan: &'p Plan, name: &str) -> anyhow::Result<&'p OperatorPlan> {
    if let Some(o) = plan.operators.iter().find(|o| o.name == name) {
        return Ok(o);
    }
    let names: Vec<&str> = plan.operators.iter().map(|o| o.name.as_str()).collect();
    if names.is_empty() {
        bail!(
            "{} has no operators\n    fix: add an `[[operators]]` entry with `name = \"{name}\"` and a `wireguard-address`",
            plan.profile_path.display()
        );
    }
    bail!(
        "no operator `{name}` in {}; operators: {}",
        plan.profile_path.display(),
        names.join(", ")
    )
}

/// `<cluster>.conf`, the cluster name cut to what wg-quick accepts (a
/// cluster name is a DNS label: its characters are all allowed).
pub fn default_file_name(cluster: &str) -> String {
    let stem: String = cluster.chars().take(WG_QUICK_NAME_MAX).collect();
    format!("{stem}.conf")
}

/// wg-quick brings up only `NAME.conf` with NAME 1 to 15 characters of
/// letters, digits and `_=+.-`: refuse a file it would refuse.
pub fn check_file_name(path: &Path) -> anyhow::Result<()> {
    let file = path.file_name().map(|f| f.to_string_lossy().to_string());
    let stem = file.as_deref().and_then(|f| f.strip_suffix(".conf"));
    let ok = stem.is_some_and(|s| {
        !s.is_empty()
            && s.len() <= WG_QUICK_NAME_MAX
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"_=+.-".contains(&c))
    });
    if !ok {
        bail!(
            "{} is not a name wg-quick brings up\n    fix: name the file NAME.conf, NAME being 1 to {WG_QUICK_NAME_MAX} letters, digits or _=+.- (it becomes the interface name), like club.conf",
            path.display()
        );
    }
    Ok(())
}

/// Write the file 0600, atomically. An existing file with the same
/// content is left alone; one with other content is replaced only with
/// `force`.
fn write_config(path: &Path, text: &str, force: bool) -> anyhow::Result<()> {
    write_unless_changed(
        path,
        text.as_bytes(),
        SECRET_FILE_MODE,
        force,
        "pass --force to replace it, or --out another file",
    )
    .with_context(|| format!("writing the operator's wg-quick file {}", path.display()))
}

/// `path` as wg-quick must be given it: a bare `club.conf` would be read
/// as an interface name (and looked up in /etc/wireguard), so it gets `./`.
pub fn wg_quick_arg(path: &Path) -> String {
    let shown = path.display().to_string();
    if shown.contains('/') {
        shown
    } else {
        format!("./{shown}")
    }
}

/// For people: how to use the file, and for an external hub the
/// `[Peer]` its admin must add.
fn next_steps(plan: &Plan, secrets: &ClusterSecrets, op: &OperatorPlan, out: &Path) -> String {
    let mut s = format!(
        "wrote {} (0600, holds {}'s private key): bring it up with `sudo wg-quick up {}`\n\
         nodes let an operator in only once rebuilt with it in the profile (kiln build)\n",
        out.display(),
        op.name,
        wg_quick_arg(out)
    );
    let Some(wg) = &plan.wireguard else { return s };
    if let (Topology::Hub, Some(HubRef::External(i))) = (wg.topology, wg.hub) {
        let key = secrets.operators[&op.name].public_key();
        s.push_str(&format!(
            "the hub {} is not built by kiln: its admin must add this to its WireGuard config (`kiln keys` prints it too):\n{}",
            wg.peers[i].name,
            render::operator_hub_stanza(op, &key)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_is_one_wg_quick_brings_up() {
        assert_eq!(default_file_name("club"), "club.conf");
        let long = default_file_name("a-very-long-cluster-name");
        assert_eq!(long, "a-very-long-clu.conf");
        check_file_name(Path::new(&long)).unwrap();
        for bad in ["x.wg", ".conf", "sixteen-chars-xx.conf", "a b.conf", "dir/"] {
            assert!(check_file_name(Path::new(bad)).is_err(), "{bad}");
        }
        check_file_name(Path::new("/home/alice/wg/club+1.conf")).unwrap();
    }

    #[test]
    fn a_bare_file_name_is_given_to_wg_quick_as_a_path() {
        assert_eq!(wg_quick_arg(Path::new("club.conf")), "./club.conf");
        assert_eq!(wg_quick_arg(Path::new("/tmp/club.conf")), "/tmp/club.conf");
    }
}
