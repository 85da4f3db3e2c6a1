//! The converted configuration as commented TOML text.

use std::fmt::Write as _;

/// One TOML table with the comment lines written above it.
#[derive(Debug, Default)]
pub struct Section {
    pub comments: Vec<String>,
    /// `[global]`, `[upstream.NAME]`, `[[server]]`...
    pub header: String,
    pub entries: Vec<Entry>,
}

#[derive(Debug)]
pub struct Entry {
    pub key: String,
    /// Already TOML (see [`string`], [`value`]).
    pub value: String,
    /// Written at the end of the line.
    pub comment: Option<String>,
}

impl Section {
    pub fn new(header: String) -> Section {
        Section {
            header,
            ..Section::default()
        }
    }

    pub fn comment(&mut self, line: impl Into<String>) {
        self.comments.push(line.into());
    }

    pub fn set(&mut self, key: &str, value: String, comment: Option<String>) {
        self.entries.push(Entry {
            key: key.to_string(),
            value,
            comment,
        });
    }
}

/// The document: header comment lines, then the sections in order.
pub fn render(header: &[String], sections: &[Section]) -> String {
    let mut out = String::new();
    for line in header {
        push_comment(&mut out, "", line);
    }
    for s in sections {
        out.push('\n');
        for line in &s.comments {
            push_comment(&mut out, "", line);
        }
        out.push_str(&s.header);
        out.push('\n');
        for e in &s.entries {
            let _ = write!(out, "{} = {}", key(&e.key), e.value);
            match &e.comment {
                Some(c) => push_comment(&mut out, "  ", c),
                None => out.push('\n'),
            }
        }
    }
    out
}

/// `# text` on one line, whatever the nginx text held: line breaks become spaces and
/// other control characters are written escaped (`\u{1}`), as TOML allows neither in
/// a comment.
fn push_comment(out: &mut String, before: &str, text: &str) {
    out.push_str(before);
    out.push('#');
    if !text.is_empty() {
        out.push(' ');
        for c in text.chars() {
            match c {
                '\n' | '\r' => out.push(' '),
                '\t' => out.push(c),
                c if c.is_control() => {
                    let _ = write!(out, "{}", c.escape_unicode());
                }
                c => out.push(c),
            }
        }
    }
    out.push('\n');
}

/// A TOML key: bare when it can be, quoted otherwise (nginx names may hold dots).
pub fn key(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        name.to_string()
    } else {
        basic_string(name)
    }
}

/// `"..."` with `"`, `\` and control characters escaped: toml writes some strings as
/// `'''...'''`, a form a value may take but a key may not.
fn basic_string(s: &str) -> String {
    let mut out = String::from('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn string(s: &str) -> String {
    value(toml::Value::String(s.to_string()))
}

pub fn value(v: toml::Value) -> String {
    v.to_string()
}

/// `{ k = v, ... }` from rendered values.
pub fn inline_table(pairs: &[(&str, String)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{} = {v}", key(k)))
        .collect();
    format!("{{ {} }}", inner.join(", "))
}

/// A multi-line array, one element per line with its comment.
pub fn array_lines(items: &[(String, String)]) -> String {
    let mut out = String::from("[\n");
    for (item, comment) in items {
        let _ = write!(out, "  {item},");
        push_comment(&mut out, "  ", comment);
    }
    out.push(']');
    out
}
