//! Walks the nginx directive tree and builds the l4lb sections, collecting every error
//! and every note on what was not carried over.

use std::path::PathBuf;

use super::emit::{self, Section};
use super::parser::Directive;
use super::{ImportError, Loc, Note, NoteKind};

/// What the walk produced; `errors` empty means `sections` is a faithful conversion.
pub struct Converted {
    pub sections: Vec<Section>,
    pub notes: Vec<Note>,
    pub errors: Vec<ImportError>,
}

/// `main` locates errors that belong to no directive (line 0 of the main file).
pub fn convert(directives: &[Directive], main: &Loc) -> Converted {
    let mut c = Converter::default();
    c.main_context(directives);
    if c.stream.is_none() {
        c.errors.push(ImportError {
            loc: main.clone(),
            directive: "stream".into(),
            message: "no stream { } block: there is nothing for l4lb to proxy".into(),
        });
    }
    let mut sections = Vec::new();
    if !c.global.is_empty() {
        let mut g = Section::new("[global]".into());
        g.comment("nginx: main context, events { } and stream-wide logging");
        // The order of l4lb's own default configuration.
        const ORDER: [&str; 5] = [
            "worker_threads",
            "max_connections",
            "log_level",
            "access_log",
            "worker_shutdown_timeout",
        ];
        c.global
            .sort_by_key(|(k, _, _)| ORDER.iter().position(|o| o == k));
        for (key, value, comment) in c.global.drain(..) {
            g.set(key, value, Some(comment));
        }
        sections.push(g);
    }
    sections.append(&mut c.upstreams);
    sections.append(&mut c.servers);
    let mut notes = c.notes;
    let mut seen = std::collections::HashSet::new();
    notes.retain(|n| seen.insert(n.to_string()));
    Converted {
        sections,
        notes,
        errors: c.errors,
    }
}

#[derive(Default)]
pub struct Converter {
    pub errors: Vec<ImportError>,
    pub notes: Vec<Note>,
    /// `[global]` keys in the order first set: key, TOML value, comment.
    global: Vec<(&'static str, String, String)>,
    pub log_level: Option<&'static str>,
    pub upstreams: Vec<Section>,
    pub servers: Vec<Section>,
    /// The `stream` block, once seen.
    pub stream: Option<Loc>,
    /// Upstream names declared so far, with where.
    pub declared: Vec<(String, Loc)>,
    /// Addresses given to proxy_pass for which an upstream was generated.
    pub generated: Vec<String>,
    /// Listening addresses so far: address, UDP, the listen directive.
    pub listening: Vec<(std::net::SocketAddr, bool, Directive)>,
    /// `limit_conn_zone` names keyed by the client address (the one key l4lb limits by).
    pub conn_zones: Vec<String>,
    /// `upsync_dump_path` files so far, with where.
    pub dump_paths: Vec<(String, Loc)>,
}

impl Converter {
    pub fn error(&mut self, d: &Directive, message: impl Into<String>) {
        self.errors.push(d.error(message));
    }

    /// Something l4lb cannot do (yet): an error, since the result would behave
    /// differently.
    pub fn unsupported(&mut self, d: &Directive, why: &str) {
        self.error(d, format!("not supported yet: {why}"));
    }

    pub fn ignore(&mut self, d: &Directive, why: &str) {
        self.note(d, NoteKind::Ignored, why);
    }

    /// Carried over, with a difference worth knowing.
    pub fn warn(&mut self, d: &Directive, what: &str) {
        self.note(d, NoteKind::Changed, what);
    }

    fn note(&mut self, d: &Directive, kind: NoteKind, text: &str) {
        self.notes.push(Note {
            loc: d.loc.clone(),
            directive: d.name.clone(),
            kind,
            text: text.to_string(),
        });
    }

    /// The block of a block directive; an error when there is none.
    pub fn block_of<'d>(&mut self, d: &'d Directive) -> &'d [Directive] {
        match &d.block {
            Some(b) => b,
            None => {
                self.error(d, "expects a block { ... }");
                &[]
            }
        }
    }

    pub fn set_global(&mut self, key: &'static str, value: String, d: &Directive) {
        self.set_global_with(key, value, source(d));
    }

    /// Sets a `[global]` key (a later setting replaces an earlier one, as in nginx).
    pub fn set_global_with(&mut self, key: &'static str, value: String, comment: String) {
        match self.global.iter_mut().find(|(k, _, _)| *k == key) {
            Some(entry) => *entry = (key, value, comment),
            None => self.global.push((key, value, comment)),
        }
    }

    pub fn has_global(&self, key: &str) -> bool {
        self.global.iter().any(|(k, _, _)| *k == key)
    }
}

/// `name args... (file:line)`, for comments.
pub fn source(d: &Directive) -> String {
    let mut text = d.name.clone();
    for a in &d.args {
        text.push(' ');
        if a.is_empty() || a.contains(char::is_whitespace) {
            text.push_str(&format!("{a:?}"));
        } else {
            text.push_str(a);
        }
    }
    format!("{text} ({})", d.loc)
}

/// The header of the output: where it came from and what was left behind.
pub fn header(files: &[PathBuf], notes: &[Note]) -> Vec<String> {
    let mut h = vec![
        "l4lb configuration converted from nginx by `l4lb import-nginx`.".to_string(),
        "Each section names the nginx block and file:line it came from.".to_string(),
        "Check it with `l4lb check -c FILE`, run it with `l4lb run -c FILE`.".to_string(),
        String::new(),
        "Source files:".to_string(),
    ];
    h.extend(files.iter().map(|f| format!("  {}", f.display())));
    h.push(String::new());
    if notes.is_empty() {
        h.push("Every directive was carried over.".into());
    } else {
        h.push("Not carried over, or carried over with a difference:".into());
        h.extend(notes.iter().map(|n| format!("  {n}")));
    }
    h
}

pub fn rendered(files: &[PathBuf], converted: &Converted) -> String {
    emit::render(&header(files, &converted.notes), &converted.sections)
}
