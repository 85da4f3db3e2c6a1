//! `l4lb import-nginx`: converts an nginx configuration (the `stream` block, with
//! nginx-stream-upsync-module's directives, and the process settings around it) into a
//! commented l4lb TOML configuration.
//!
//! Every directive is either carried over, reported as not carried over with the reason
//! (a [`Note`]), or an error naming file:line when l4lb cannot honour it: a conversion
//! that would behave differently is refused rather than written.

mod convert;
mod emit;
mod global;
mod lexer;
mod parser;
mod server;
mod stream;
mod upstream;
mod values;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a directive was written. Line 0 stands for the file as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    pub file: Arc<Path>,
    pub line: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}:{}", self.file.display(), self.line)
        }
    }
}

/// One reason the configuration cannot be converted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportError {
    pub loc: Loc,
    /// The directive at fault, `(syntax)` for a syntax error, empty for the file itself.
    pub directive: String,
    pub message: String,
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.directive.is_empty() {
            write!(f, "{}: {}", self.loc, self.message)
        } else {
            write!(f, "{}: {}: {}", self.loc, self.directive, self.message)
        }
    }
}

/// Every error found, in file and line order.
#[derive(Debug)]
pub struct ImportErrors(pub Vec<ImportError>);

impl fmt::Display for ImportErrors {
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

impl std::error::Error for ImportErrors {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoteKind {
    /// Not carried over: it has no meaning, or no effect, in l4lb.
    Ignored,
    /// Carried over, with a difference the user should know about.
    Changed,
}

/// Something the user should know about the conversion of one directive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub loc: Loc,
    pub directive: String,
    pub kind: NoteKind,
    pub text: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            NoteKind::Ignored => "ignored",
            NoteKind::Changed => "note",
        };
        write!(f, "{}: {}: {kind}: {}", self.loc, self.directive, self.text)
    }
}

/// A converted configuration.
#[derive(Debug)]
pub struct Imported {
    pub toml: String,
    pub notes: Vec<Note>,
    /// The files read, the main one first.
    pub files: Vec<PathBuf>,
}

/// Converts one file's text without reading what it includes (the fuzz target's way
/// in: no file system).
pub(crate) fn convert_text(text: &str, file: &Arc<Path>) -> Result<String, ImportErrors> {
    let mut errors = Vec::new();
    let directives = parser::parse(text, file, &mut errors);
    let main = Loc {
        file: Arc::clone(file),
        line: 0,
    };
    let mut converted = convert::convert(&directives, &main);
    errors.append(&mut converted.errors);
    if !errors.is_empty() {
        return Err(ImportErrors(errors));
    }
    Ok(convert::rendered(&[file.to_path_buf()], &converted))
}

/// Reads `path` (and what it includes) and converts it.
pub fn import(path: &Path) -> Result<Imported, ImportErrors> {
    let loaded = parser::load(path);
    if loaded.files.is_empty() {
        // The main file could not be read: nothing else to say.
        return Err(ImportErrors(loaded.errors));
    }
    let main = Loc {
        file: Arc::from(path),
        line: 0,
    };
    let mut converted = convert::convert(&loaded.directives, &main);
    // Files in reading order, then lines; one line keeps its order.
    let order = |loc: &Loc| {
        let file = loaded
            .files
            .iter()
            .position(|f| **f == *loc.file)
            .unwrap_or(usize::MAX);
        (file, loc.line)
    };
    let mut errors = loaded.errors;
    errors.append(&mut converted.errors);
    if !errors.is_empty() {
        errors.sort_by_key(|e| order(&e.loc));
        return Err(ImportErrors(errors));
    }
    converted.notes.sort_by_key(|n| order(&n.loc));
    Ok(Imported {
        toml: convert::rendered(&loaded.files, &converted),
        notes: converted.notes,
        files: loaded.files,
    })
}
