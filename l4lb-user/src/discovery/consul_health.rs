//! Consul's health API: the passing instances of one service, with blocking queries.
//!
//! `url` is e.g. `http://127.0.0.1:8500/v1/health/service/mysql`. An instance's address
//! is `Service.Address`, or `Node.Address` when that is empty; its weight is
//! `Service.Weights.Passing` (1 when absent or 0).

use std::net::{IpAddr, SocketAddr};

use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tracing::warn;

use super::consul::BlockingQuery;
use super::params::ServerParams;
use super::{Source, SourceError};
use crate::config::{ServerSpec, UpsyncConfig};

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "Node")]
    node: Node,
    #[serde(rename = "Service")]
    service: Service,
}

#[derive(Deserialize)]
struct Node {
    #[serde(rename = "Node", default)]
    name: String,
    #[serde(rename = "Address", default)]
    address: String,
}

#[derive(Deserialize)]
struct Service {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Address", default)]
    address: String,
    #[serde(rename = "Port")]
    port: u16,
    #[serde(rename = "Weights", default)]
    weights: Option<Weights>,
}

#[derive(Deserialize)]
struct Weights {
    #[serde(rename = "Passing", default)]
    passing: u32,
}

pub struct ConsulHealth {
    query: BlockingQuery,
}

impl ConsulHealth {
    pub fn new(cfg: &UpsyncConfig) -> anyhow::Result<Self> {
        let mut url = Url::parse(&cfg.url)?;
        let service = url
            .path()
            .split_once("/v1/health/service/")
            .map(|(_, s)| s.trim_matches('/'));
        if service.is_none_or(str::is_empty) {
            anyhow::bail!(
                "a consul_health url has the form http://HOST:PORT/v1/health/service/NAME"
            );
        }
        url.query_pairs_mut().append_key_only("passing");
        Ok(ConsulHealth {
            query: BlockingQuery::new(cfg, url)?,
        })
    }
}

fn parse(status: StatusCode, body: &[u8]) -> Result<Vec<ServerSpec>, SourceError> {
    if status == StatusCode::NOT_FOUND {
        return Ok(Vec::new());
    }
    parse_body(body)
}

/// The passing instances of a 200 answer. An instance l4lb cannot connect to (a host
/// name for an address, port 0: valid registrations in Consul) is left out with a
/// warning, and the others apply: rejecting the whole answer would freeze the set
/// until that one registration changed.
pub(crate) fn parse_body(body: &[u8]) -> Result<Vec<ServerSpec>, SourceError> {
    let entries: Vec<Entry> = serde_json::from_slice(body).map_err(|e| {
        SourceError::bad("(response body)", format!("not a Consul health list: {e}"))
    })?;
    Ok(entries
        .iter()
        .filter_map(|e| match instance(e) {
            Ok(spec) => Some(spec),
            Err(why) => {
                warn!(node = %e.node.name, service = %e.service.id, reason = why, "Consul instance left out");
                None
            }
        })
        .collect())
}

fn instance(e: &Entry) -> Result<ServerSpec, String> {
    let host = if e.service.address.is_empty() {
        &e.node.address
    } else {
        &e.service.address
    };
    let ip: IpAddr = host
        .parse()
        .map_err(|_| format!("address {host:?} is not an IP address"))?;
    if e.service.port == 0 {
        return Err("Service.Port is 0".into());
    }
    let addr = SocketAddr::new(ip, e.service.port);
    let weight = e.service.weights.as_ref().map_or(1, |w| w.passing.max(1));
    let params = ServerParams {
        weight: Some(weight),
        ..ServerParams::default()
    };
    Ok(params.to_spec(addr.to_string(), addr))
}

impl Source for ConsulHealth {
    fn position(&self) -> u64 {
        self.query.index()
    }

    fn resume_at(&mut self, position: u64) {
        self.query.resume_at(position);
    }

    async fn next(&mut self) -> Result<Vec<ServerSpec>, SourceError> {
        self.query.fetch(parse).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_address_then_node_address_and_passing_weight() {
        let body = br#"[
          {"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"a","Address":"","Port":3306,"Weights":{"Passing":5,"Warning":1}}},
          {"Node":{"Node":"n2","Address":"10.0.0.2"},"Service":{"ID":"b","Address":"10.9.9.9","Port":3307}}
        ]"#;
        let servers = parse(StatusCode::OK, body).unwrap();
        assert_eq!(servers[0].addr, "10.0.0.1:3306".parse().unwrap());
        assert_eq!(servers[0].weight, 5);
        assert_eq!(servers[1].addr, "10.9.9.9:3307".parse().unwrap());
        assert_eq!(servers[1].weight, 1);
    }

    #[test]
    fn an_instance_without_an_ip_address_or_port_is_left_out() {
        let body = br#"[
          {"Node":{"Node":"n1","Address":"db.example"},"Service":{"ID":"a","Port":1}},
          {"Node":{"Node":"n2","Address":"10.0.0.2"},"Service":{"ID":"b","Port":0}},
          {"Node":{"Node":"n3","Address":"10.0.0.3"},"Service":{"ID":"c","Port":3306}}
        ]"#;
        let servers = parse(StatusCode::OK, body).unwrap();
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].addr, "10.0.0.3:3306".parse().unwrap());
        assert!(parse(StatusCode::OK, b"{}").is_err());
    }
}
