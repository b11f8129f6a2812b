//! Diagnostics for the profile: every error names the file, the line and
//! column, the key, and what to do about it. Validation collects them all
//! instead of stopping at the first.

use std::fmt;
use std::ops::Range;

/// One problem found in a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `nodes[2].mac` (empty for syntax errors).
    pub key: String,
    pub message: String,
    /// What the user can do about it.
    pub hint: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        write!(f, "{}", self.message)?;
        if !self.hint.is_empty() {
            write!(f, "\n    fix: {}", self.hint)?;
        }
        Ok(())
    }
}

/// The collected diagnostics of one profile file.
#[derive(Debug)]
pub struct Diagnostics<'s> {
    file: String,
    source: &'s str,
    items: Vec<Diagnostic>,
}

impl<'s> Diagnostics<'s> {
    pub fn new(file: impl Into<String>, source: &'s str) -> Self {
        Diagnostics {
            file: file.into(),
            source,
            items: Vec::new(),
        }
    }

    /// Record an error at `span` (byte offsets into the source).
    pub fn error(
        &mut self,
        span: Range<usize>,
        key: &str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        let (line, column) = line_col(self.source, span.start);
        self.items.push(Diagnostic {
            file: self.file.clone(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
            hint: hint.into(),
        });
    }

    /// Record that a required key is missing, unless the key is present
    /// but already reported as invalid (one mistake, one error).
    pub fn missing(
        &mut self,
        span: Range<usize>,
        key: &str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        if !self.items.iter().any(|d| d.key == key) {
            self.error(span, key, message, hint);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// All diagnostics, in the order they appear in the file.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.items.sort_by_key(|d| (d.line, d.column));
        self.items.dedup();
        self.items
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = source[line_start..offset].chars().count() + 1;
    (line, column)
}

/// The error returned when a profile has problems: all of them, printable.
#[derive(Debug)]
pub struct ProfileErrors(pub Vec<Diagnostic>);

impl fmt::Display for ProfileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "error: {d}")?;
        }
        let n = self.0.len();
        write!(
            f,
            "{n} error{} in the profile",
            if n == 1 { "" } else { "s" }
        )
    }
}

impl std::error::Error for ProfileErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 11), (2, 6));
    }
}
