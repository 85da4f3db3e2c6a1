//! The HTTP client every source shares: TLS from the upsync settings, the ACL token as
//! a sensitive header (never printed), capped response bodies.

use std::time::Duration;

use anyhow::Context;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Client, RequestBuilder, Response};

use super::SourceError;
use crate::config::UpsyncConfig;

/// Largest response body a source reads: a few MB is tens of thousands of servers, and
/// a source gone wrong must not exhaust memory.
pub const MAX_BODY: usize = 8 << 20;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the client for one upsync source. `token_header` names the header the token
/// travels in (`X-Consul-Token` for Consul).
pub fn client(cfg: &UpsyncConfig, token_header: Option<&'static str>) -> anyhow::Result<Client> {
    let mut headers = HeaderMap::new();
    if let (Some(name), Some(token)) = (token_header, &cfg.token) {
        let mut value =
            HeaderValue::from_str(token).context("the upsync token is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    let mut builder = Client::builder()
        .default_headers(headers)
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(Duration::from_secs(30))
        // A redirect would carry the token header to wherever it points (reqwest drops
        // only standard credentials when following one); Consul and etcd never send one.
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if let Some(ca) = &cfg.ca_file {
        let pem =
            std::fs::read(ca).with_context(|| format!("cannot read ca_file {}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("ca_file {} holds no usable PEM certificate", ca.display()))?;
        builder = builder.tls_certs_only(certs);
    }
    if let Some(cert) = &cfg.client_cert {
        let mut pem = std::fs::read(cert)
            .with_context(|| format!("cannot read client_cert {}", cert.display()))?;
        if let Some(key) = &cfg.client_key {
            pem.push(b'\n');
            pem.extend(
                std::fs::read(key)
                    .with_context(|| format!("cannot read client_key {}", key.display()))?,
            );
        }
        let identity = reqwest::Identity::from_pem(&pem)
            .context("client_cert/client_key: need a PEM certificate and its private key")?;
        builder = builder.identity(identity);
    }
    builder.build().context("cannot build the HTTP client")
}

/// Sends a request; connection errors and timeouts become [`SourceError::Transport`].
pub async fn send(req: RequestBuilder) -> Result<Response, SourceError> {
    req.send().await.map_err(transport)
}

/// Reads a whole body, refusing more than [`MAX_BODY`] bytes.
pub async fn body(mut resp: Response) -> Result<Vec<u8>, SourceError> {
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(SourceError::TooLarge { limit: MAX_BODY });
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport)? {
        if out.len() + chunk.len() > MAX_BODY {
            return Err(SourceError::TooLarge { limit: MAX_BODY });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A non-success status with the start of its body, for the log.
pub async fn status_error(resp: Response) -> SourceError {
    let status = resp.status().as_u16();
    let text = body(resp)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    SourceError::Status {
        status,
        body: text
            .chars()
            .take(200)
            .collect::<String>()
            .trim()
            .to_string(),
    }
}

/// The whole cause chain: reqwest's own message alone often says only "error sending
/// request". Without the URL: it may carry user:password, and callers name the source
/// by its shown URL anyway.
pub fn transport(e: reqwest::Error) -> SourceError {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    SourceError::Transport(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn transport_errors_never_carry_credentials() {
        // Port 1 on loopback: nothing listens, the connect is refused at once.
        let err = reqwest::Client::new()
            .get("http://admin:s3cret-pass@127.0.0.1:1/v1/kv/upstreams/db?token=t0ken")
            .send()
            .await
            .expect_err("nothing listens on port 1");
        let SourceError::Transport(msg) = transport(err) else {
            panic!("not a transport error");
        };
        assert!(!msg.contains("s3cret") && !msg.contains("t0ken"), "{msg}");
        assert!(msg.contains("error sending request"), "{msg}");
    }
}
