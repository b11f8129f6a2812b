//! Diagnostics for the profile: every error names the file, the line and
//! column, the key, and what to do about it. Validation collects them all
//! instead of stopping at the first.

use std::collections::HashSet;
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
        // Escaped again here for diagnostics built elsewhere: escaping is
        // idempotent (the output holds no control characters).
        write!(
            f,
            "{}:{}:{}: ",
            escape_controls(&self.file),
            self.line,
            self.column
        )?;
        if !self.key.is_empty() {
            write!(f, "{}: ", escape_controls(&self.key))?;
        }
        write!(f, "{}", escape_controls(&self.message))?;
        if !self.hint.is_empty() {
            // A hint may be a multi-line snippet to paste (kiln upgrade):
            // its newlines are kept, every other control escaped.
            let hint: Vec<String> = self.hint.split('\n').map(escape_controls).collect();
            write!(f, "\n    fix: {}", hint.join("\n"))?;
        }
        Ok(())
    }
}

/// `s` with every control character (C0, DEL, C1: ESC, BEL, CR, NUL, ...)
/// written as a Rust escape (`\u{1b}`, `\n`), so text taken from a profile
/// cannot move the cursor, retitle or clear the operator's terminal.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Byte offsets where each line starts, computed once per file so that
/// turning an offset into a line is a binary search, not a rescan (a
/// profile with thousands of errors stays linear).
#[derive(Debug, Clone)]
pub struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(source: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(
            source
                .bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex { starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, source: &str, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(source.len());
        while !source.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts[line - 1];
        (line, source[start..offset].chars().count() + 1)
    }
}

/// The collected diagnostics of one profile file.
#[derive(Debug)]
pub struct Diagnostics<'s> {
    file: String,
    source: &'s str,
    lines: LineIndex,
    items: Vec<Diagnostic>,
    /// Keys with an error, so checks that depend on a broken value can
    /// stay quiet (one mistake, one error).
    reported: HashSet<String>,
}

impl<'s> Diagnostics<'s> {
    pub fn new(file: impl Into<String>, source: &'s str) -> Self {
        Diagnostics {
            file: file.into(),
            source,
            lines: LineIndex::new(source),
            items: Vec::new(),
            reported: HashSet::new(),
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
        let (line, column) = self.lines.line_col(self.source, span.start);
        self.reported.insert(key.to_string());
        self.items.push(Diagnostic {
            file: escape_controls(&self.file),
            line,
            column,
            key: escape_controls(key),
            message: escape_controls(&message.into()),
            hint: escape_controls(&hint.into()),
        });
    }

    /// The profile's text (to find where a value's characters sit inside
    /// its literal).
    pub fn source(&self) -> &'s str {
        self.source
    }

    /// The 1-based line of a byte offset (to name another entry's line).
    pub fn line_of(&self, offset: usize) -> usize {
        self.lines.line_col(self.source, offset).0
    }

    /// Has `key`, or a table or array holding it, been reported as
    /// invalid? (`nodes[1].endpoint` is broken if `nodes[1]` or `nodes` is.)
    pub fn is_broken(&self, key: &str) -> bool {
        if self.reported.contains(key) {
            return true;
        }
        key.char_indices()
            .filter(|&(_, c)| c == '.' || c == '[')
            .any(|(i, _)| self.reported.contains(&key[..i]))
    }

    /// Whether any diagnostic so far is a TOML syntax error.
    pub fn has_syntax_error(&self) -> bool {
        self.items
            .iter()
            .any(|d| d.key.is_empty() && d.message.starts_with("TOML syntax"))
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
        if !self.is_broken(key) {
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
/// For one look-up; [`Diagnostics`] keeps a [`LineIndex`] for many.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    LineIndex::new(source).line_col(source, offset)
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
        assert_eq!(line_col(src, 12), (2, 7));
        assert_eq!(line_col(src, 99), (3, 1));
        assert_eq!(line_col("é\nx", 1), (1, 1), "inside a character");
    }

    #[test]
    fn control_characters_are_escaped_in_every_part_of_a_diagnostic() {
        let src = "name = \"x\"\n";
        let mut d = Diagnostics::new("lab\u{7}.toml", src);
        d.error(
            0..4,
            "nodes[0].\u{1b}]0;owned\u{7}",
            "`\u{1b}[2J\u{9b}x\r` is bad",
            "fix\n it",
        );
        let shown = ProfileErrors(d.into_sorted()).to_string();
        for c in shown.chars() {
            assert!(!c.is_control() || c == '\n', "raw {c:?} in {shown:?}");
        }
        assert!(shown.contains(r"\u{1b}[2J\u{9b}x\r"), "{shown}");
        assert!(shown.contains(r"fix\n it"), "{shown}");
        assert_eq!(escape_controls("plain"), "plain");
    }
}
