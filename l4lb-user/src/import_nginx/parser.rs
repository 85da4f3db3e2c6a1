//! nginx configuration files as a tree of directives, each with the file and line it
//! was written on, `include` expanded.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::lexer::{tokenize, Lexed, Token};
use super::{ImportError, Loc};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directive {
    pub name: String,
    pub args: Vec<String>,
    /// `Some` for a block directive (`upstream x { ... }`), even an empty one.
    pub block: Option<Vec<Directive>>,
    pub loc: Loc,
}

impl Directive {
    pub fn error(&self, message: impl Into<String>) -> ImportError {
        ImportError {
            loc: self.loc.clone(),
            directive: self.name.clone(),
            message: message.into(),
        }
    }
}

/// Every directive of a configuration, the files it was read from (in reading order)
/// and every syntax or include error.
pub struct Loaded {
    pub directives: Vec<Directive>,
    pub files: Vec<PathBuf>,
    pub errors: Vec<ImportError>,
}

/// Reads `main` and everything it includes. Relative `include` paths are taken from the
/// directory of `main`, as nginx takes them from its configuration prefix (the directory
/// of the file given with `-c`), whichever file the `include` is in.
pub fn load(main: &Path) -> Loaded {
    let mut loader = Loader {
        conf_dir: main.parent().map(Path::to_path_buf).unwrap_or_default(),
        files: Vec::new(),
        errors: Vec::new(),
        reading: Vec::new(),
    };
    let directives = loader.file(main, None, None);
    Loaded {
        directives,
        files: loader.files,
        errors: loader.errors,
    }
}

/// Parses one file's text (no `include` expansion), for tests and for [`load`].
pub fn parse(text: &str, file: &Arc<Path>, errors: &mut Vec<ImportError>) -> Vec<Directive> {
    let tokens = match tokenize(text) {
        Ok(t) => t,
        Err(e) => {
            errors.push(syntax(file, e.line, e.message));
            return Vec::new();
        }
    };
    let mut p = Parser {
        tokens: &tokens,
        pos: 0,
        file,
        errors,
    };
    p.block(None)
}

fn syntax(file: &Arc<Path>, line: usize, message: impl Into<String>) -> ImportError {
    ImportError {
        loc: Loc {
            file: Arc::clone(file),
            line,
        },
        directive: "(syntax)".into(),
        message: message.into(),
    }
}

struct Parser<'a> {
    tokens: &'a [Lexed],
    pos: usize,
    file: &'a Arc<Path>,
    errors: &'a mut Vec<ImportError>,
}

impl Parser<'_> {
    fn loc(&self, line: usize) -> Loc {
        Loc {
            file: Arc::clone(self.file),
            line,
        }
    }

    /// Directives up to the `}` closing `opener` (name and line), or to the end of the
    /// file at the top level. Errors are recorded and parsing goes on, so one missing
    /// `;` does not hide the next problem.
    fn block(&mut self, opener: Option<(&str, usize)>) -> Vec<Directive> {
        let mut out = Vec::new();
        let mut words: Vec<String> = Vec::new();
        let mut first_line = 0;
        loop {
            let Some(t) = self.tokens.get(self.pos) else {
                if let Some(name) = words.first() {
                    self.errors.push(ImportError {
                        loc: self.loc(first_line),
                        directive: name.clone(),
                        message: "unexpected end of file, expecting \";\"".into(),
                    });
                }
                if let Some((name, line)) = opener {
                    self.errors.push(ImportError {
                        loc: self.loc(line),
                        directive: name.to_string(),
                        message: "block is not closed: unexpected end of file, expecting \"}\""
                            .into(),
                    });
                }
                return out;
            };
            self.pos += 1;
            match &t.token {
                Token::Word(w) => {
                    if words.is_empty() {
                        first_line = t.line;
                    }
                    words.push(w.clone());
                }
                Token::Semicolon => match self.directive(&mut words, first_line) {
                    Some(d) => out.push(d),
                    None => self
                        .errors
                        .push(syntax(self.file, t.line, "unexpected \";\"")),
                },
                Token::Open => {
                    let name = words.first().cloned().unwrap_or_default();
                    let block = self.block(Some((&name, t.line)));
                    match self.directive(&mut words, first_line) {
                        Some(mut d) => {
                            d.block = Some(block);
                            out.push(d);
                        }
                        None => self
                            .errors
                            .push(syntax(self.file, t.line, "unexpected \"{\"")),
                    }
                }
                Token::Close => {
                    if let Some(name) = words.first() {
                        self.errors.push(ImportError {
                            loc: self.loc(first_line),
                            directive: name.clone(),
                            message: format!(
                                "missing \";\" (the block closes on line {} first)",
                                t.line
                            ),
                        });
                        words.clear();
                    }
                    if opener.is_some() {
                        return out;
                    }
                    self.errors
                        .push(syntax(self.file, t.line, "unexpected \"}\""));
                }
            }
        }
    }

    fn directive(&self, words: &mut Vec<String>, line: usize) -> Option<Directive> {
        let mut taken = std::mem::take(words).into_iter();
        let name = taken.next()?;
        Some(Directive {
            name,
            args: taken.collect(),
            block: None,
            loc: self.loc(line),
        })
    }
}

struct Loader {
    conf_dir: PathBuf,
    files: Vec<PathBuf>,
    errors: Vec<ImportError>,
    /// Files being read, outermost first: an include of one of them is a cycle.
    reading: Vec<PathBuf>,
}

impl Loader {
    /// `parent` names the block the file's directives land in; `from` is the include.
    fn file(
        &mut self,
        path: &Path,
        parent: Option<&str>,
        from: Option<&Directive>,
    ) -> Vec<Directive> {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if self.reading.contains(&canonical) {
            if let Some(d) = from {
                self.errors.push(d.error(format!(
                    "{} includes itself, directly or through other files",
                    path.display()
                )));
            }
            return Vec::new();
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.errors.push(match from {
                    Some(d) => d.error(format!("cannot read {}: {e}", path.display())),
                    None => ImportError {
                        loc: Loc {
                            file: Arc::from(path),
                            line: 0,
                        },
                        directive: String::new(),
                        message: format!("cannot read: {e}"),
                    },
                });
                return Vec::new();
            }
        };
        if !self.files.iter().any(|f| f == path) {
            self.files.push(path.to_path_buf());
        }
        let file: Arc<Path> = Arc::from(path);
        let directives = parse(&text, &file, &mut self.errors);
        self.reading.push(canonical);
        let expanded = self.expand(directives, parent);
        self.reading.pop();
        expanded
    }

    fn expand(&mut self, directives: Vec<Directive>, parent: Option<&str>) -> Vec<Directive> {
        // nginx-upsync configurations `include` the upstream's own dump file, which
        // need not exist where the import runs; l4lb reads that file itself (dump_path),
        // so such an include stays for the converter to report.
        let dump_paths: Vec<String> = if parent == Some("upstream") {
            directives
                .iter()
                .filter(|d| d.name == "upsync_dump_path")
                .filter_map(|d| d.args.first().cloned())
                .collect()
        } else {
            Vec::new()
        };
        let mut out = Vec::new();
        for mut d in directives {
            if d.name == "include" && d.block.is_none() {
                match d.args.as_slice() {
                    [arg] if dump_paths.contains(arg) => out.push(d),
                    [arg] => {
                        let arg = arg.clone();
                        out.extend(self.include(&d, &arg, parent));
                    }
                    _ => self
                        .errors
                        .push(d.error("takes exactly one file name or pattern")),
                }
                continue;
            }
            if let Some(block) = d.block.take() {
                d.block = Some(self.expand(block, Some(&d.name)));
            }
            out.push(d);
        }
        out
    }

    /// nginx: a pattern with `*`, `?` or `[` may match nothing; a plain name must exist.
    /// Matches are read in alphabetical order.
    fn include(&mut self, d: &Directive, arg: &str, parent: Option<&str>) -> Vec<Directive> {
        let path = self.conf_dir.join(arg);
        if !arg.contains(['*', '?', '[']) {
            return self.file(&path, parent, Some(d));
        }
        let Some(pattern) = path.to_str() else {
            self.errors.push(d.error("the pattern is not valid UTF-8"));
            return Vec::new();
        };
        // As glob(3), which nginx uses: `*` does not match a leading dot.
        let options = glob::MatchOptions {
            require_literal_leading_dot: true,
            ..glob::MatchOptions::new()
        };
        let matches = match glob::glob_with(pattern, options) {
            Ok(m) => m,
            Err(e) => {
                self.errors
                    .push(d.error(format!("invalid pattern {arg:?}: {e}")));
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for m in matches {
            match m {
                Ok(p) if p.is_file() => out.extend(self.file(&p, parent, Some(d))),
                Ok(_) => {}
                Err(e) => self.errors.push(d.error(format!("cannot read {e}"))),
            }
        }
        out
    }
}
