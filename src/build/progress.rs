//! Progress on stderr: one line per stage with its time (mkosi's
//! `complete_step()`).

use std::time::Instant;

use anyhow::Context as _;

use crate::util::cancel::Cancel;

/// Progress on stderr: one line per stage with its time.
pub struct Progress {
    start: Instant,
    cancel: Cancel,
}

impl Progress {
    pub fn new() -> Self {
        Self::with_cancel(Cancel::default())
    }

    /// Progress whose stages do not start once `cancel` is set.
    pub fn with_cancel(cancel: Cancel) -> Self {
        Progress {
            start: Instant::now(),
            cancel,
        }
    }

    /// Run one named stage (unless the build was cancelled before it).
    pub fn stage<T>(&self, what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        self.cancel.check()?;
        let t = Instant::now();
        let spinner = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let s = indicatif::ProgressBar::new_spinner();
            s.set_message(what.to_string());
            s.enable_steady_tick(std::time::Duration::from_millis(120));
            Some(s)
        } else {
            eprintln!("kiln: {what} …");
            None
        };
        let r = f();
        let secs = t.elapsed().as_secs_f64();
        if let Some(s) = spinner {
            s.finish_and_clear();
        }
        match &r {
            Ok(_) => eprintln!("kiln: {what}: done in {secs:.1} s"),
            Err(_) => eprintln!("kiln: {what}: failed after {secs:.1} s"),
        }
        r.with_context(|| what.to_string())
    }

    pub fn total(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}
