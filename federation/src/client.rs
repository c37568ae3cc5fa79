//! The outbound federation client: X-Matrix-signed JSON requests to other servers, over HTTPS
//! with server discovery ([`crate::discovery`]), TLS verification, timeouts, bounded response
//! bodies and the SSRF guard. Nothing a peer returns can make it panic.

use std::{sync::Arc, time::Duration};

use http::{header, Method};
use myelin_core::{
    ruma::{
        api::federation::authentication::{XMatrix, XMatrixSigningInput},
        OwnedServerName, ServerName,
    },
    Server,
};
use serde_json::Value;

use crate::discovery::{ip_literal, is_public_ip, Discovery, GuardedResolver, Refused};

/// Time to set up a connection (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a whole request, response body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for a `/.well-known/matrix/server` lookup.
const WELL_KNOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read from a peer.
pub const MAX_RESPONSE_BYTES: usize = 50 * 1024 * 1024;

/// Why a federation request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FedError {
    /// The server could not be reached (DNS, connection, TLS, or the connection broke).
    #[error("{destination} unreachable: {reason}")]
    Unreachable { destination: String, reason: String },
    /// The server did not answer in time.
    #[error("{destination} timed out")]
    Timeout { destination: String },
    /// The destination resolves only to addresses the SSRF guard refuses.
    #[error("{destination} refused: {reason}")]
    Forbidden { destination: String, reason: String },
    /// The server answered with a non-2xx status; `errcode`/`error` come from its Matrix error
    /// body when it sent one.
    #[error("{destination} answered {status}: {} {}", errcode.as_deref().unwrap_or("-"), error.as_deref().unwrap_or(""))]
    Remote {
        destination: String,
        status: u16,
        errcode: Option<String>,
        error: Option<String>,
    },
    /// The response (or a key response, a signature…) was not what the spec requires.
    #[error("{destination} sent a malformed response: {reason}")]
    Malformed { destination: String, reason: String },
    /// Something on our side failed (signing, building the request).
    #[error("internal error: {0}")]
    Internal(String),
}

impl FedError {
    /// The HTTP status the remote server answered with, for [`FedError::Remote`].
    pub fn status(&self) -> Option<u16> {
        match self {
            FedError::Remote { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The Matrix `errcode` the remote server answered with, if any.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            FedError::Remote { errcode, .. } => errcode.as_deref(),
            _ => None,
        }
    }

    fn malformed(destination: &ServerName, reason: impl Into<String>) -> Self {
        FedError::Malformed {
            destination: destination.to_string(),
            reason: reason.into(),
        }
    }
}

/// An error and its sources on one line (reqwest's own `Display` hides the cause).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// Makes requests to other homeservers on behalf of this one.
pub struct FederationClient {
    server: Arc<Server>,
    http: reqwest::Client,
    discovery: Discovery,
    allow_private: bool,
}

impl FederationClient {
    /// A client using the configuration, server name and signing key of `server`. Fails when the
    /// configured CA file cannot be read or the TLS setup is impossible.
    pub fn new(server: Arc<Server>) -> Result<Self, String> {
        let config = &server.config;
        let allow_private = config.federation_allow_private_addresses;
        let mut roots = Vec::new();
        if let Some(path) = &config.federation_ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("option `federation_ca_file`: {}: {e}", path.display()))?;
            roots = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("option `federation_ca_file`: {}: {e}", path.display()))?;
        }
        let builder = |resolver: GuardedResolver| {
            let mut b = reqwest::Client::builder()
                .use_rustls_tls()
                .dns_resolver(Arc::new(resolver))
                .no_proxy()
                .connect_timeout(CONNECT_TIMEOUT)
                .user_agent(concat!("Myelin/", env!("CARGO_PKG_VERSION")))
                .danger_accept_invalid_certs(!config.federation_verify_tls);
            for root in &roots {
                b = b.add_root_certificate(root.clone());
            }
            b
        };
        let resolver = GuardedResolver::new(allow_private);
        let http = builder(resolver.clone())
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("federation HTTP client: {}", error_chain(&e)))?;
        // The `.well-known` client resolves names plainly (port 443), without SRV routes, and
        // follows a few redirects, never to a refused IP literal.
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 5 {
                return attempt.error("too many redirects");
            }
            let refused = attempt
                .url()
                .host_str()
                .and_then(ip_literal)
                .is_some_and(|ip| !allow_private && !is_public_ip(ip));
            if refused || attempt.url().scheme() != "https" {
                attempt.stop()
            } else {
                attempt.follow()
            }
        });
        let well_known = builder(GuardedResolver::new(allow_private))
            .timeout(WELL_KNOWN_TIMEOUT)
            .redirect(redirects)
            .build()
            .map_err(|e| format!("well-known HTTP client: {}", error_chain(&e)))?;
        Ok(FederationClient {
            server,
            http,
            discovery: Discovery::new(resolver, well_known),
            allow_private,
        })
    }

    /// Our server name.
    pub fn origin(&self) -> &ServerName {
        &self.server.server_name
    }

    /// X-Matrix-signed request; `path_and_query` like
    /// `/_matrix/federation/v1/send/123?x=y` (already percent-encoded). JSON body in and out;
    /// a 2xx answer is returned as parsed JSON.
    pub async fn request(
        &self,
        destination: &ServerName,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<Value, FedError> {
        self.send(destination, method, path_and_query, body, true)
            .await
    }

    /// Unsigned `GET` (used to fetch keys).
    pub async fn get_unauthenticated(
        &self,
        destination: &ServerName,
        path_and_query: &str,
    ) -> Result<Value, FedError> {
        self.send(destination, Method::GET, path_and_query, None, false)
            .await
    }

    async fn send(
        &self,
        destination: &ServerName,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        signed: bool,
    ) -> Result<Value, FedError> {
        if !path_and_query.starts_with('/') {
            return Err(FedError::Internal(format!(
                "request target {path_and_query:?} does not start with /"
            )));
        }
        if !self.allow_private {
            if let Some(ip) = ip_literal(destination.host()) {
                if !is_public_ip(ip) {
                    return Err(FedError::Forbidden {
                        destination: destination.to_string(),
                        reason: format!("{ip} is not a public address"),
                    });
                }
            }
        }
        let dest = self.discovery.resolve(destination).await;
        let url = reqwest::Url::parse(&format!("{}{path_and_query}", dest.base_url()))
            .map_err(|e| FedError::Internal(format!("bad URL for {destination}: {e}")))?;
        // Sign the target exactly as it goes on the wire (the URL parser may have normalised it).
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let bytes = match body {
            Some(v) => serde_json::to_vec(v).map_err(|e| FedError::Internal(e.to_string()))?,
            None => Vec::new(),
        };
        let mut req = self
            .http
            .request(method.clone(), url)
            .header(header::HOST, &dest.host_header)
            .header(header::ACCEPT, "application/json");
        if signed {
            let auth = self.authorization(destination, &method, &target, &bytes)?;
            req = req.header(header::AUTHORIZATION, auth);
        }
        if body.is_some() {
            req = req
                .header(header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => {
                let e = self.transport_error(destination, &e);
                if matches!(e, FedError::Unreachable { .. }) {
                    // Maybe the resolution is stale; look again next time.
                    self.discovery.forget(destination);
                }
                return Err(e);
            }
        };
        self.read_json(destination, resp).await
    }

    /// The `Authorization: X-Matrix …` value for a request (spec: "Request Authentication").
    pub fn authorization(
        &self,
        destination: &ServerName,
        method: &Method,
        target: &str,
        body: &[u8],
    ) -> Result<String, FedError> {
        x_matrix_header(
            &self.server.server_name,
            destination,
            &self.server.key.pair,
            method,
            target,
            body,
        )
    }

    fn transport_error(&self, destination: &ServerName, e: &reqwest::Error) -> FedError {
        let destination = destination.to_string();
        if e.is_timeout() {
            return FedError::Timeout { destination };
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(cause) = source {
            if let Some(refused) = cause.downcast_ref::<Refused>() {
                return FedError::Forbidden {
                    destination,
                    reason: refused.to_string(),
                };
            }
            source = cause.source();
        }
        FedError::Unreachable {
            destination,
            reason: error_chain(e),
        }
    }

    async fn read_json(
        &self,
        destination: &ServerName,
        mut resp: reqwest::Response,
    ) -> Result<Value, FedError> {
        let status = resp.status();
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
        {
            return Err(FedError::malformed(destination, "response body too large"));
        }
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(FedError::malformed(destination, "response body too large"));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(self.transport_error(destination, &e)),
            }
        }
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| FedError::malformed(destination, format!("not JSON: {e}")));
        }
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        let field = |name: &str| {
            json.as_ref()
                .and_then(|j| j.get(name))
                .and_then(|v| v.as_str())
                .map(|s| s.chars().take(1000).collect::<String>())
        };
        Err(FedError::Remote {
            destination: destination.to_string(),
            status: status.as_u16(),
            errcode: field("errcode"),
            error: field("error"),
        })
    }
}

/// Builds an `X-Matrix` `Authorization` value: signs `{method, uri, origin, destination,
/// content?}` with `key` (ruma's request signing) and renders it in the spec's recommended form
/// (`origin`, `destination`, `key`, `sig`, all quoted, lower-case names).
pub fn x_matrix_header(
    origin: &ServerName,
    destination: &ServerName,
    key: &myelin_core::ruma::signatures::Ed25519KeyPair,
    method: &Method,
    target: &str,
    body: &[u8],
) -> Result<String, FedError> {
    let request = http::Request::builder()
        .method(method.clone())
        .uri(target)
        .body(body)
        .map_err(|e| FedError::Internal(format!("request target {target:?}: {e}")))?;
    let input = XMatrixSigningInput::new(
        OwnedServerName::from(origin),
        OwnedServerName::from(destination),
        key,
    );
    let x = XMatrix::sign_http_request(&request, input)
        .map_err(|e| FedError::Internal(format!("signing the request: {e}")))?;
    Ok(format!(
        r#"X-Matrix origin="{}",destination="{}",key="{}",sig="{}""#,
        origin,
        destination,
        x.key,
        x.sig.encode()
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use myelin_core::ruma::{
        serde::Base64,
        signatures::{Ed25519KeyPair, PublicKeyMap},
    };

    use super::*;

    fn name(s: &str) -> OwnedServerName {
        OwnedServerName::try_from(s).unwrap()
    }

    #[test]
    fn x_matrix_round_trip() {
        let der = Ed25519KeyPair::generate().to_vec();
        let key = Ed25519KeyPair::from_der(&der, "k1".to_owned()).unwrap();
        let origin = name("origin.example");
        let dest = name("dest.example:8448");
        let target = "/_matrix/federation/v1/send/123?x=y";
        let body = br#"{"pdus":[],"edus":[]}"#;
        let header = x_matrix_header(&origin, &dest, &key, &Method::PUT, target, body).unwrap();
        assert!(header.starts_with(r#"X-Matrix origin="origin.example",destination="dest.example:8448",key="ed25519:k1",sig=""#));

        let parsed = XMatrix::parse(&header).unwrap();
        assert_eq!(parsed.origin, origin);
        assert_eq!(parsed.destination.as_deref(), Some(&*dest));
        let mut keys = PublicKeyMap::new();
        keys.insert(
            "origin.example".to_owned(),
            BTreeMap::from([(
                "ed25519:k1".to_owned(),
                Base64::new(key.public_key().to_vec()),
            )]),
        );
        let request = http::Request::builder()
            .method(Method::PUT)
            .uri(target)
            .body(&body[..])
            .unwrap();
        parsed.verify_http_request(&request, &dest, &keys).unwrap();

        // Another target, body or destination does not verify.
        let other = http::Request::builder()
            .method(Method::PUT)
            .uri("/_matrix/federation/v1/send/124?x=y")
            .body(&body[..])
            .unwrap();
        assert!(parsed.verify_http_request(&other, &dest, &keys).is_err());
        let other = http::Request::builder()
            .method(Method::PUT)
            .uri(target)
            .body(&br#"{"pdus":[]}"#[..])
            .unwrap();
        assert!(parsed.verify_http_request(&other, &dest, &keys).is_err());
        assert!(parsed
            .verify_http_request(&request, &name("elsewhere.example"), &keys)
            .is_err());
    }

    #[test]
    fn fed_error_accessors() {
        let e = FedError::Remote {
            destination: "x".into(),
            status: 403,
            errcode: Some("M_FORBIDDEN".into()),
            error: Some("no".into()),
        };
        assert_eq!(e.status(), Some(403));
        assert_eq!(e.errcode(), Some("M_FORBIDDEN"));
        assert!(e.to_string().contains("M_FORBIDDEN"));
        let e = FedError::Timeout {
            destination: "x".into(),
        };
        assert_eq!((e.status(), e.errcode()), (None, None));
    }
}
