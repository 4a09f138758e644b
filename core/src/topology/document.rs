//! A TOML document that keeps the span of every value, and a reader for its tables.
//!
//! The `toml` crate's typed deserialisation stops at the first error and forgets
//! where nested values came from. [`Node`] keeps a byte span on every value, so a
//! later check can name the line and column of the field it rejects, and
//! [`TableReader`] takes the known keys of one table and reports every key left
//! over as an unknown field.

use super::error::Cx;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use toml::Spanned;

/// A TOML value that keeps the byte span of every nested value, so that
/// semantic errors can point at the offending field.
#[derive(Debug)]
pub(super) enum Node {
    Str(String),
    Int(i64),
    Float,
    Bool(bool),
    Datetime,
    Array(Vec<Spanned<Node>>),
    Table(BTreeMap<String, Spanned<Node>>),
}

/// A TOML table with spans on its values.
pub(super) type NodeTable = BTreeMap<String, Spanned<Node>>;

/// Key under which the toml deserializer hands out date-times.
const TOML_DATETIME_KEY: &str = "$__toml_private_datetime";

impl Node {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Node::Str(_) => "a string",
            Node::Int(_) => "an integer",
            Node::Float => "a float",
            Node::Bool(_) => "a boolean",
            Node::Datetime => "a date-time",
            Node::Array(_) => "an array",
            Node::Table(_) => "a table",
        }
    }
}

struct NodeVisitor;

impl<'de> serde::de::Visitor<'de> for NodeVisitor {
    type Value = Node;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Node, E> {
        i64::try_from(v)
            .map(Node::Int)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E>(self, _v: f64) -> Result<Node, E> {
        Ok(Node::Float)
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut table = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == TOML_DATETIME_KEY {
                let _: String = map.next_value()?;
                return Ok(Node::Datetime);
            }
            let value: Spanned<Node> = map.next_value()?;
            table.insert(key, value);
        }
        Ok(Node::Table(table))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

/// A decoded value with its span and field path.
#[derive(Clone, Debug)]
pub(super) struct At<T> {
    pub(super) value: T,
    pub(super) span: Range<usize>,
    pub(super) field: String,
}

/// Reads the keys of one TOML table; whatever is left at [`TableReader::finish`]
/// is reported as an unknown field.
pub(super) struct TableReader<'n> {
    /// Field path of the table (`machine[2]`), empty for the document root.
    path: String,
    span: Range<usize>,
    entries: BTreeMap<&'n str, &'n Spanned<Node>>,
    allowed: &'static [&'static str],
}

impl<'n> TableReader<'n> {
    pub(super) fn new(
        path: String,
        span: Range<usize>,
        table: &'n NodeTable,
        allowed: &'static [&'static str],
    ) -> Self {
        TableReader {
            path,
            span,
            entries: table.iter().map(|(k, v)| (k.as_str(), v)).collect(),
            allowed,
        }
    }

    fn field_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Takes `key` and converts it with `conv` (which returns what is wrong).
    /// Missing: an error if `required`, else `None` silently.
    fn get<T>(
        &mut self,
        cx: &mut Cx<'_>,
        key: &str,
        required: bool,
        expected: &str,
        conv: impl FnOnce(&Node) -> Result<T, String>,
    ) -> Option<At<T>> {
        let field = self.field_path(key);
        let Some(node) = self.entries.remove(key) else {
            if required {
                let span = self.span.clone();
                cx.error(&span, &field, format!("missing; expected {expected}"));
            }
            return None;
        };
        let span = node.span();
        match conv(node.get_ref()) {
            Ok(value) => Some(At { value, span, field }),
            Err(problem) => {
                cx.error(&span, &field, format!("{problem}; expected {expected}"));
                None
            }
        }
    }

    pub(super) fn required<T>(
        &mut self,
        cx: &mut Cx<'_>,
        key: &str,
        expected: &str,
        conv: impl FnOnce(&Node) -> Result<T, String>,
    ) -> Option<At<T>> {
        self.get(cx, key, true, expected, conv)
    }

    pub(super) fn optional<T>(
        &mut self,
        cx: &mut Cx<'_>,
        key: &str,
        expected: &str,
        conv: impl FnOnce(&Node) -> Result<T, String>,
    ) -> Option<At<T>> {
        self.get(cx, key, false, expected, conv)
    }

    /// Takes `key` raw (for sub-tables and arrays).
    pub(super) fn take(&mut self, key: &str) -> Option<&'n Spanned<Node>> {
        self.entries.remove(key)
    }

    /// Reports every key that was not taken.
    pub(super) fn finish(self, cx: &mut Cx<'_>) {
        let mut left: Vec<(&str, &Spanned<Node>)> = self.entries.into_iter().collect();
        left.sort_by_key(|(_, v)| v.span().start);
        let expected = self
            .allowed
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        for (key, value) in left {
            let field = if self.path.is_empty() {
                key.to_owned()
            } else {
                format!("{}.{key}", self.path)
            };
            cx.error(
                &value.span(),
                &field,
                format!("unknown field `{key}`; expected one of {expected}"),
            );
        }
    }
}

/// The table at `node`, or an error naming `field`.
pub(super) fn as_table<'n>(
    cx: &mut Cx<'_>,
    node: &'n Spanned<Node>,
    field: &str,
    expected: &str,
) -> Option<&'n NodeTable> {
    match node.get_ref() {
        Node::Table(t) => Some(t),
        other => {
            cx.error(
                &node.span(),
                field,
                format!("found {}; expected {expected}", other.kind()),
            );
            None
        }
    }
}

/// The tables of an array of tables `[[key]]` (empty if absent), each with its
/// index, span and table. Reports non-table items and more than `max` items.
pub(super) fn array_of_tables<'n>(
    cx: &mut Cx<'_>,
    root: &mut TableReader<'n>,
    key: &str,
    max: usize,
) -> Vec<(usize, Range<usize>, &'n NodeTable)> {
    let Some(node) = root.take(key) else {
        return Vec::new();
    };
    let items = match node.get_ref() {
        Node::Array(items) => items,
        other => {
            cx.error(
                &node.span(),
                key,
                format!(
                    "found {}; expected an array of tables, written `[[{key}]]`",
                    other.kind()
                ),
            );
            return Vec::new();
        }
    };
    if items.len() > max {
        cx.error(
            &node.span(),
            key,
            format!("{} `[[{key}]]` tables; expected at most {max}", items.len()),
        );
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("{key}[{i}]");
        if let Some(t) = as_table(cx, item, &field, &format!("a table, written `[[{key}]]`")) {
            out.push((i, item.span(), t));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::topology::test_fixture::{assert_error, errors_of, good_with};

    #[test]
    fn topology_unknown_keys_rejected_everywhere() {
        let text = good_with("id = 7\n", "id = 7\ncolour = \"red\"\n").replacen(
            "outbound = true\n",
            "outbound = true\noutbund = 1\n",
            1,
        ) + "\n[extra]\nx = 1\n";
        let errs = errors_of(&text);
        assert_error(&errs, 5, "group.colour", "unknown field `colour`");
        assert_error(
            &errs,
            25,
            "machine[0].outbund",
            "expected one of `name`, `ip`",
        );
        assert_error(&errs, 39, "extra", "unknown field `extra`");
        assert_eq!(errs.len(), 3, "{errs:?}");
    }
}
