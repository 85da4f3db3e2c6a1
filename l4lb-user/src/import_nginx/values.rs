//! nginx argument spellings checked and turned into TOML values l4lb reads the same way.

use std::time::Duration;

use crate::config::units::{parse_duration, parse_size};

use super::emit;
use super::parser::Directive;

/// The directive's only argument.
pub fn single(d: &Directive) -> Result<&str, String> {
    match d.args.as_slice() {
        [a] => Ok(a),
        _ => Err(format!("takes one argument, {} given", d.args.len())),
    }
}

/// Variables are evaluated per session in nginx; l4lb's settings are fixed.
pub fn no_variables(s: &str) -> Result<&str, String> {
    if s.contains('$') {
        Err(format!("{s:?}: variables are not supported"))
    } else {
        Ok(s)
    }
}

pub fn flag(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

/// A time as written (nginx spellings are l4lb's), spaces removed (`"1m 30s"`).
pub fn duration(s: &str) -> Result<String, String> {
    let compact: String = no_variables(s)?.split_whitespace().collect();
    parse_duration(&compact)?;
    Ok(emit::string(&compact))
}

/// A time l4lb needs above zero (it refuses a zero interval or timeout, where nginx
/// would poll or time out at once).
pub fn positive_duration(s: &str) -> Result<String, String> {
    let compact: String = no_variables(s)?.split_whitespace().collect();
    if parse_duration(&compact)?.is_zero() {
        return Err(format!("{s:?} must be greater than zero"));
    }
    Ok(emit::string(&compact))
}

/// A time l4lb needs to be at least `min` (an upsync timeout: a blocking query or
/// watch shorter than a second would end before any change came).
pub fn duration_at_least(s: &str, min: Duration) -> Result<String, String> {
    let compact: String = no_variables(s)?.split_whitespace().collect();
    if parse_duration(&compact)? < min {
        return Err(format!("{s:?} must be at least {min:?}"));
    }
    Ok(emit::string(&compact))
}

pub fn size(s: &str) -> Result<String, String> {
    parse_size(no_variables(s)?)?;
    Ok(emit::string(s))
}

pub fn number(s: &str) -> Result<String, String> {
    s.parse::<u32>()
        .map(|n| emit::value(toml::Value::Integer(i64::from(n))))
        .map_err(|_| format!("{s:?}: expected a whole number"))
}

/// `host:port` or `[v6]:port` with a numeric port.
pub fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}
