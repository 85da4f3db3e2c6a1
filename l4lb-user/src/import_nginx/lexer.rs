//! Splits nginx configuration text into words and the three marks `;`, `{`, `}`, the
//! way nginx's own reader does: a word ends at whitespace, `;` or `{` (but `${` stays in
//! the word, for `${var}`); quotes group; `#` starts a comment only where a word could
//! start, so `a#b` is one word.

use thiserror::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Token {
    Word(String),
    Semicolon,
    Open,
    Close,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lexed {
    pub token: Token,
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct LexError {
    pub line: usize,
    pub message: String,
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

pub fn tokenize(text: &str) -> Result<Vec<Lexed>, LexError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(&c) = chars.peek() {
        let mark = match c {
            '\n' => {
                line += 1;
                chars.next();
                continue;
            }
            c if c.is_whitespace() => {
                chars.next();
                continue;
            }
            '#' => {
                while chars.next_if(|&c| c != '\n').is_some() {}
                continue;
            }
            ';' => Token::Semicolon,
            '{' => Token::Open,
            '}' => Token::Close,
            '"' | '\'' => {
                let start = line;
                chars.next();
                let word = quoted(&mut chars, c, &mut line).ok_or_else(|| LexError {
                    line: start,
                    message: format!("unexpected end of file in a string opened with {c}"),
                })?;
                if let Some(&n) = chars.peek() {
                    // `)` starts the next word, as in nginx: `if ($m = 'GET') {`.
                    if !(n.is_whitespace() || matches!(n, ';' | '{' | '}' | ')')) {
                        return Err(LexError {
                            line,
                            message: format!("unexpected \"{n}\" after a quoted string"),
                        });
                    }
                }
                out.push(Lexed {
                    token: Token::Word(word),
                    line: start,
                });
                continue;
            }
            _ => {
                let start = line;
                let word = bare(&mut chars, &mut line);
                out.push(Lexed {
                    token: Token::Word(word),
                    line: start,
                });
                continue;
            }
        };
        chars.next();
        out.push(Lexed { token: mark, line });
    }
    Ok(out)
}

/// The rest of a quoted word, up to the closing `quote`; `None` at end of input.
fn quoted(chars: &mut Chars<'_>, quote: char, line: &mut usize) -> Option<String> {
    let mut word = String::new();
    loop {
        let c = chars.next()?;
        match c {
            c if c == quote => return Some(word),
            '\\' => escaped(chars, &mut word, line),
            '\n' => {
                *line += 1;
                word.push(c);
            }
            c => word.push(c),
        }
    }
}

fn bare(chars: &mut Chars<'_>, line: &mut usize) -> String {
    let mut word = String::new();
    while let Some(&c) = chars.peek() {
        match c {
            ';' => break,
            '{' if !word.ends_with('$') => break,
            c if c.is_whitespace() => break,
            '\\' => {
                chars.next();
                escaped(chars, &mut word, line);
            }
            c => {
                chars.next();
                word.push(c);
            }
        }
    }
    word
}

/// After a backslash: nginx turns `\"`, `\'`, `\\`, `\t`, `\r`, `\n` into the character
/// and keeps the backslash before anything else.
fn escaped(chars: &mut Chars<'_>, word: &mut String, line: &mut usize) {
    match chars.next() {
        Some(c @ ('"' | '\'' | '\\')) => word.push(c),
        Some('t') => word.push('\t'),
        Some('r') => word.push('\r'),
        Some('n') => word.push('\n'),
        Some(c) => {
            if c == '\n' {
                *line += 1;
            }
            word.push('\\');
            word.push(c);
        }
        None => word.push('\\'),
    }
}
