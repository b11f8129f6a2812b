//! What a boot is checked against and what it reports: each check's
//! expectation and sighting, the boot timeline, and what the checks need
//! besides the VM. Types only, shared by every group of checks.

use std::path::PathBuf;

use crate::config::plan::{NodePlan, Plan};
use crate::render::NodeFiles;

/// One check: what was expected, what the guest showed.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub expected: String,
    pub seen: String,
    pub pass: bool,
}

impl Check {
    pub fn new(
        name: &str,
        expected: impl Into<String>,
        seen: impl Into<String>,
        pass: bool,
    ) -> Check {
        Check {
            name: name.to_string(),
            expected: expected.into(),
            seen: seen.into(),
            pass,
        }
    }

    pub fn eq(name: &str, expected: &str, seen: &str) -> Check {
        Check::new(
            name,
            expected.trim(),
            seen.trim(),
            expected.trim() == seen.trim(),
        )
    }
}

/// A named moment of the boot, in host seconds since QEMU started.
#[derive(Debug, Clone)]
pub struct Mark {
    pub what: String,
    pub at: Option<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub node: String,
    pub checks: Vec<Check>,
    pub timeline: Vec<Mark>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.pass)
    }

    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The table: check, expected, seen, result.
    pub fn table(&self) -> String {
        let clip = |s: &str| {
            let one = s.replace('\n', " ⏎ ");
            if one.chars().count() > 60 {
                format!("{}…", one.chars().take(59).collect::<String>())
            } else {
                one
            }
        };
        let rows: Vec<[String; 4]> = self
            .checks
            .iter()
            .map(|c| {
                [
                    c.name.clone(),
                    clip(&c.expected),
                    clip(&c.seen),
                    if c.pass { "pass".into() } else { "FAIL".into() },
                ]
            })
            .collect();
        let head = ["CHECK", "EXPECTED", "SEEN", "RESULT"];
        let mut w = head.map(|h| h.chars().count());
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut s = String::new();
        for r in std::iter::once(head.map(String::from)).chain(rows) {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c}{}", " ".repeat(w[i] - c.chars().count())))
                .collect();
            s.push_str(cells.join("  ").trim_end());
            s.push('\n');
        }
        let failed = self.checks.iter().filter(|c| !c.pass).count();
        s.push_str(&format!(
            "{} checks, {} passed, {} failed\n",
            self.checks.len(),
            self.checks.len() - failed,
            failed
        ));
        s.push_str("\nboot timeline (host seconds since QEMU started)\n");
        for m in &self.timeline {
            s.push_str(&format!(
                "  {:<28} {}\n",
                m.what,
                m.at.map_or("-".into(), |t| format!("{t:6.1} s"))
            ));
        }
        s
    }
}

/// What the checks need besides the VM.
pub struct Expect<'a> {
    pub plan: &'a Plan,
    pub node: &'a NodePlan,
    pub files: &'a NodeFiles,
    /// The node's WireGuard public key, as `kiln keys` prints it.
    pub wg_public_key: String,
    /// Private keys for the profile's users, where the caller has them.
    pub user_keys: Vec<(String, PathBuf)>,
    /// A real k3s (not the double) is in the image.
    pub real_k3s: bool,
    /// How the node booted.
    pub medium: Medium,
}

/// Where the root came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Medium {
    /// Slot A of the disk image.
    #[default]
    Disk,
    /// Netbooted: the root image over HTTP (with this sha256) into RAM;
    /// /var on the disk's state partition if `disk`, else in RAM.
    Net { root_sha256: String, disk: bool },
}
