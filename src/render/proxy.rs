//! `[k3s.proxy]`: the proxy environment of k3s, in a file of kiln's that
//! `k3s.service` reads (`EnvironmentFile=`), on every node.
//!
//! k3s hands its environment to the containerd it runs (stripping the
//! `CONTAINERD_` prefix from variables meant for containerd only), so one
//! set of `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` serves k3s, the
//! kubelet and image pulls (k3s docs, "Configuring an HTTP proxy"). They
//! are written in capitals only: Go, which k3s and containerd are written
//! in, reads the capitals first and the lower-case names only when the
//! capitals are unset. Pods get none of it.

use crate::config::plan::Plan;
use crate::render::tree::FileTree;

use super::{SECRET_MODE, header};

/// The environment file; under `/etc/kiln/`, which `write-files` cannot
/// touch, so it never fights a user's `/etc/default/k3s`.
pub const ENV_FILE: &str = "/etc/kiln/k3s-proxy.env";

/// `KEY=value` lines (values never need quotes: the URLs and entries
/// are checked for it), or `None` without `[k3s.proxy]`.
pub fn env_file(plan: &Plan) -> Option<String> {
    let p = plan.proxy.as_ref()?;
    let mut s = header("#", plan);
    if let Some(u) = &p.http {
        s.push_str(&format!("HTTP_PROXY={u}\n"));
    }
    if let Some(u) = &p.https {
        s.push_str(&format!("HTTPS_PROXY={u}\n"));
    }
    s.push_str(&format!("NO_PROXY={}\n", p.no_proxy.join(",")));
    Some(s)
}

/// 0600: a proxy URL may carry a password.
pub fn render(plan: &Plan, tree: &mut FileTree) {
    if let Some(text) = env_file(plan) {
        tree.file(ENV_FILE, SECRET_MODE, text);
    }
}
