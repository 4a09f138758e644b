//! Errors of a topology file, and the collector that positions them.
//!
//! A [`TopologyError`] names the file, line, column and field and says what was
//! expected; [`TopologyErrors`] is every one found in a file, sorted. Reading
//! works on byte spans; [`Cx`] turns a span into a 1-based line and column and
//! collects the errors, so the reader keeps going after the first problem.

use std::fmt;
use std::ops::Range;

/// One problem in a topology file, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyError {
    /// File name as given to [`Topology::parse`](super::Topology::parse).
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column (in characters).
    pub column: u32,
    /// Field path, e.g. `machine[2].ip` (empty for TOML syntax errors).
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "field `{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for TopologyError {}

/// Every error found in one topology file, sorted by position. Never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyErrors(pub(super) Vec<TopologyError>);

impl TopologyErrors {
    /// The errors, sorted by line and column.
    pub fn errors(&self) -> &[TopologyError] {
        &self.0
    }

    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates over the errors.
    pub fn iter(&self) -> std::slice::Iter<'_, TopologyError> {
        self.0.iter()
    }
}

impl IntoIterator for TopologyErrors {
    type Item = TopologyError;
    type IntoIter = std::vec::IntoIter<TopologyError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a TopologyErrors {
    type Item = &'a TopologyError;
    type IntoIter = std::slice::Iter<'a, TopologyError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for TopologyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TopologyErrors {}

/// Parsing context: the text (for positions) and the errors found so far.
pub(super) struct Cx<'t> {
    file: &'t str,
    pub(super) text: &'t str,
    line_starts: Vec<usize>,
    pub(super) errors: Vec<TopologyError>,
}

impl<'t> Cx<'t> {
    pub(super) fn new(text: &'t str, file: &'t str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Cx {
            file,
            text,
            line_starts,
            errors: Vec::new(),
        }
    }

    /// 1-based line and column of byte `offset`.
    fn position(&self, offset: usize) -> (u32, u32) {
        let offset = offset.min(self.text.len());
        let line_index = self
            .line_starts
            .partition_point(|&start| start <= offset)
            .saturating_sub(1);
        let start = self.line_starts.get(line_index).copied().unwrap_or(0);
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (
            u32::try_from(line_index + 1).unwrap_or(u32::MAX),
            u32::try_from(column + 1).unwrap_or(u32::MAX),
        )
    }

    /// 1-based line of byte `offset`.
    pub(super) fn line(&self, offset: usize) -> u32 {
        self.position(offset).0
    }

    pub(super) fn error(&mut self, span: &Range<usize>, field: &str, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.errors.push(TopologyError {
            file: self.file.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn error_at_start(&mut self, field: &str, message: impl Into<String>) {
        self.error(&(0..0), field, message);
    }
}

#[cfg(test)]
mod tests {
    use crate::topology::test_fixture::{errors_of, good_with};
    use crate::topology::Topology;

    #[test]
    fn topology_error_display_names_file_line_column_and_field() {
        let text = good_with("ip = \"10.10.0.3\"", "ip = \"10.10.0.2\"");
        let errs = Topology::parse(&text, "topology/x.toml").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs.to_string(),
            "topology/x.toml:27:6: field `machine[1].ip`: duplicate IPv4 address 10.10.0.2 \
             (already used by machine `web` at line 20); expected a unique address per machine"
        );
    }

    #[test]
    fn topology_collects_all_errors_sorted() {
        let text = good_with("id = 7", "id = -1")
            .replacen("ip = \"10.10.0.3\"", "ip = \"10.10.0.2\"", 1)
            .replacen("size = \"1GiB\"", "size = 1", 1);
        let errs = errors_of(&text);
        let lines: Vec<u32> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![4, 27, 35], "{errs:?}");
    }
}
