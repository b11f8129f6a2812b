//! Cancellation passed down from `main`: the binary's signal handler sets
//! a [`Cancel`] token and nothing else; long jobs check it between steps
//! and inside long loops, external tools ([`super::tool`]) are stopped
//! when it is set, and the work returns [`Interrupted`] through the
//! ordinary error path, so staging directories and VMs are cleaned up by
//! their `Drop`, never by the handler. The library keeps no process-wide
//! state for this: every token is one a caller made and handed down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A token the caller sets to ask a job to stop. Clones share the flag.
/// `Cancel::default()` is a token nobody sets (tests, short commands).
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask every holder of this token to stop (safe from a signal
    /// handler's thread).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The flag itself, for loops written against an `AtomicBool` (the
    /// HTTP server's stop flag).
    pub fn flag(&self) -> &AtomicBool {
        &self.0
    }

    /// `Err(Interrupted)` once the token is set.
    pub fn check(&self) -> Result<(), Interrupted> {
        if self.is_cancelled() {
            Err(Interrupted::new())
        } else {
            Ok(())
        }
    }

    /// `w`, failing its next write once the token is set: for a long
    /// stream into a child's stdin (the writer stops, the child sees EOF).
    pub fn writer<W: std::io::Write>(&self, w: W) -> CancelWriter<W> {
        CancelWriter {
            inner: w,
            cancel: self.clone(),
        }
    }
}

/// The error of a job stopped through its [`Cancel`]; `main` recognises
/// it (anywhere in the chain) and exits as after a signal. Its text is
/// what the user is told (`interrupted`, or what the job left behind).
#[derive(Debug)]
pub struct Interrupted(String);

impl Interrupted {
    pub fn new() -> Self {
        Interrupted("interrupted".into())
    }

    /// An interruption that says what it left, e.g. "interrupted: removed
    /// X; OUT is as it was".
    pub fn saying(message: impl Into<String>) -> Self {
        Interrupted(message.into())
    }
}

impl Default for Interrupted {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

/// The [`Interrupted`] in `err`'s chain (outermost first), if any,
/// including one carried inside an `io::Error` (from [`CancelWriter`]).
pub fn interrupted(err: &anyhow::Error) -> Option<&Interrupted> {
    err.chain().find_map(|c| {
        c.downcast_ref::<Interrupted>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<Interrupted>())
        })
    })
}

/// See [`Cancel::writer`].
pub struct CancelWriter<W> {
    inner: W,
    cancel: Cancel,
}

impl<W: std::io::Write> std::io::Write for CancelWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Not ErrorKind::Interrupted: `write_all` would retry forever.
        self.cancel.check().map_err(std::io::Error::other)?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn clones_share_the_token_and_a_writer_stops_once_it_is_set() {
        let c = Cancel::new();
        let held = c.clone();
        assert!(held.check().is_ok());
        let mut w = held.writer(Vec::new());
        w.write_all(b"before").unwrap();
        c.cancel();
        assert!(held.is_cancelled());
        let err = anyhow::Error::from(w.write_all(b"after").unwrap_err()).context("streaming");
        assert_eq!(interrupted(&err).unwrap().to_string(), "interrupted");
        assert!(interrupted(&anyhow::anyhow!("other")).is_none());
    }
}
