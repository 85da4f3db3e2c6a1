//! Server parameters as JSON: nginx-upsync's KV values, also the admin API's bodies.
//!
//! upsync writes numbers either as JSON numbers or as numeric strings, and `down` /
//! `backup` as 0/1; both spellings are accepted (and JSON booleans too).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::{units, ServerSpec};

/// nginx-upsync's defaults for a key with an empty value.
pub const UPSYNC_MAX_FAILS: u32 = 2;
pub const UPSYNC_FAIL_TIMEOUT: Duration = Duration::from_secs(10);

/// The fields of one server that a value may set; `None` keeps the current value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerParams {
    pub weight: Option<u32>,
    pub max_fails: Option<u32>,
    pub fail_timeout: Option<Duration>,
    pub down: Option<bool>,
    pub backup: Option<bool>,
    pub max_conns: Option<u32>,
}

/// A field that could not be used, named so the error message points at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

const FIELDS: [&str; 6] = [
    "weight",
    "max_fails",
    "fail_timeout",
    "down",
    "backup",
    "max_conns",
];

/// How strictly a value is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strictness {
    /// As nginx-upsync: unknown fields ignored, weight 0 means 1.
    Upsync,
    /// The admin API: unknown fields and weight 0 are errors.
    Admin,
}

impl ServerParams {
    pub fn from_json(value: &Value, strictness: Strictness) -> Result<Self, FieldError> {
        let Value::Object(map) = value else {
            return Err(FieldError {
                field: "(value)".into(),
                message: "expected a JSON object".into(),
            });
        };
        if strictness == Strictness::Admin {
            if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
                return Err(FieldError {
                    // An empty key is named as JSON writes it, so the error still
                    // points at something.
                    field: if unknown.is_empty() {
                        "\"\"".into()
                    } else {
                        unknown.clone()
                    },
                    message: format!("unknown field (expected one of {})", FIELDS.join(", ")),
                });
            }
        }
        let mut weight = uint(map, "weight")?;
        if weight == Some(0) {
            match strictness {
                Strictness::Upsync => weight = Some(1),
                Strictness::Admin => {
                    return Err(FieldError {
                        field: "weight".into(),
                        message: "must be at least 1".into(),
                    })
                }
            }
        }
        Ok(ServerParams {
            weight,
            max_fails: uint(map, "max_fails")?,
            fail_timeout: duration(map, "fail_timeout")?,
            down: flag(map, "down")?,
            backup: flag(map, "backup")?,
            max_conns: uint(map, "max_conns")?,
        })
    }

    /// A server with upsync's defaults for every field the value leaves out.
    pub fn to_spec(&self, name: String, addr: SocketAddr) -> ServerSpec {
        let mut spec = ServerSpec {
            name,
            max_fails: UPSYNC_MAX_FAILS,
            fail_timeout: UPSYNC_FAIL_TIMEOUT,
            ..ServerSpec::new(addr)
        };
        self.apply_to(&mut spec);
        spec
    }

    pub fn apply_to(&self, spec: &mut ServerSpec) {
        if let Some(v) = self.weight {
            spec.weight = v;
        }
        if let Some(v) = self.max_fails {
            spec.max_fails = v;
        }
        if let Some(v) = self.fail_timeout {
            spec.fail_timeout = v;
        }
        if let Some(v) = self.down {
            spec.down = v;
        }
        if let Some(v) = self.backup {
            spec.backup = v;
        }
        if let Some(v) = self.max_conns {
            spec.max_conns = v;
        }
    }
}

fn err(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn uint(map: &Map<String, Value>, field: &str) -> Result<Option<u32>, FieldError> {
    let parsed = match map.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Some(Value::String(s)) => s.trim().parse::<u32>().ok(),
        Some(_) => None,
    };
    parsed.map(Some).ok_or_else(|| {
        err(
            field,
            format!("expected a non-negative integer, got {}", map[field]),
        )
    })
}

/// Seconds as a number or numeric string (upsync), or an nginx duration like "500ms".
fn duration(map: &Map<String, Value>, field: &str) -> Result<Option<Duration>, FieldError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let s = n.as_u64().ok_or_else(|| {
                err(
                    field,
                    format!("expected seconds as a non-negative integer, got {n}"),
                )
            })?;
            units::seconds(s).map(Some).map_err(|e| err(field, e))
        }
        Some(Value::String(s)) => units::parse_duration(s)
            .map(Some)
            .map_err(|e| err(field, e)),
        Some(other) => Err(err(
            field,
            format!("expected seconds or a duration like \"10s\", got {other}"),
        )),
    }
}

fn flag(map: &Map<String, Value>, field: &str) -> Result<Option<bool>, FieldError> {
    let parsed = match map.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
        Some(Value::String(s)) => match s.trim() {
            "0" | "false" => Some(false),
            "1" | "true" => Some(true),
            _ => None,
        },
        Some(_) => None,
    };
    parsed.map(Some).ok_or_else(|| {
        err(
            field,
            format!("expected 0, 1, true or false, got {}", map[field]),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_and_numeric_strings_as_upsync_writes_them() {
        let p = ServerParams::from_json(
            &json!({"weight": "3", "max_fails": 0, "fail_timeout": "20", "down": 1, "backup": "0"}),
            Strictness::Upsync,
        )
        .unwrap();
        assert_eq!(p.weight, Some(3));
        assert_eq!(p.max_fails, Some(0));
        assert_eq!(p.fail_timeout, Some(Duration::from_secs(20)));
        assert_eq!(p.down, Some(true));
        assert_eq!(p.backup, Some(false));
    }

    #[test]
    fn defaults_are_upsyncs() {
        let spec = ServerParams::default().to_spec("a".into(), "127.0.0.1:1".parse().unwrap());
        assert_eq!(
            (spec.weight, spec.max_fails, spec.fail_timeout),
            (1, 2, Duration::from_secs(10))
        );
        assert!(!spec.down && !spec.backup);
    }

    #[test]
    fn weight_zero_is_one_for_upsync_and_an_error_for_admin() {
        let v = json!({"weight": 0});
        assert_eq!(
            ServerParams::from_json(&v, Strictness::Upsync)
                .unwrap()
                .weight,
            Some(1)
        );
        assert_eq!(
            ServerParams::from_json(&v, Strictness::Admin)
                .unwrap_err()
                .field,
            "weight"
        );
    }

    #[test]
    fn errors_name_the_field() {
        for (v, field) in [
            (json!({"weight": "x"}), "weight"),
            (json!({"max_fails": -1}), "max_fails"),
            (json!({"fail_timeout": "soon"}), "fail_timeout"),
            (json!({"down": 2}), "down"),
            (json!({"backup": []}), "backup"),
            // Past what a deadline can be: once accepted, the first connect failure
            // panicked computing `now + fail_timeout`.
            (json!({"fail_timeout": u64::MAX}), "fail_timeout"),
        ] {
            assert_eq!(
                ServerParams::from_json(&v, Strictness::Upsync)
                    .unwrap_err()
                    .field,
                field,
                "{v}"
            );
        }
        let e = ServerParams::from_json(&json!({"wieght": 1}), Strictness::Admin).unwrap_err();
        assert_eq!(e.field, "wieght");
        // Found by fuzzing the admin body: `{"": true}` was refused naming the field "".
        let e = ServerParams::from_json(&json!({"": true}), Strictness::Admin).unwrap_err();
        assert_eq!(e.to_string(), format!("\"\": {}", e.message));
        assert!(ServerParams::from_json(&json!({"wieght": 1}), Strictness::Upsync).is_ok());
        assert!(ServerParams::from_json(&json!([1]), Strictness::Upsync).is_err());
    }
}
