//! Inbound request authentication (spec: "Request Authentication"): the [`Signed`] extractor
//! checks the `X-Matrix` `Authorization` header of a federation request against the origin's
//! keys from the [`KeyRing`].
//!
//! Parsing is ruma's `XMatrix::parse` (quoted or unquoted values, any order, case-insensitive
//! names, unknown parameters ignored, `sig`), retried after quoting bare values when it fails, so
//! that unquoted values with colons (`origin=example.org:8448`, which the spec asks recipients to
//! allow for older senders) are accepted too. A `destination` that is present must be our server
//! name. The signed object is `{method, uri, origin, destination, content?}`, with `uri` the path
//! and query exactly as received (`OriginalUri`, so nesting routers does not change it).
//!
//! Several `Authorization` headers: each X-Matrix one is tried in order (at most
//! [`MAX_AUTH_HEADERS`]) and the request is accepted when any verifies, as Synapse does.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{FromRef, FromRequest, OriginalUri, Request},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{
    ruma::{api::federation::authentication::XMatrix, signatures::PublicKeyMap, OwnedServerName},
    store::now_ms,
};
use serde_json::{json, Value};

use crate::keyring::KeyRing;

/// Most `Authorization` headers looked at on one request.
pub const MAX_AUTH_HEADERS: usize = 4;

/// A federation request whose X-Matrix signature verified.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The server that signed the request.
    pub origin: OwnedServerName,
    /// The JSON body, if the request had one.
    pub body: Option<Value>,
    /// The body bytes exactly as received (for code that must keep events byte for byte).
    pub raw: Bytes,
}

/// Parses an `Authorization` value as X-Matrix: as is, else with every unquoted parameter value
/// quoted (older servers send colons unquoted). `None` when it is not an X-Matrix header.
pub fn parse_x_matrix(value: &str) -> Option<XMatrix> {
    if let Ok(x) = XMatrix::parse(value) {
        return Some(x);
    }
    let value = value.trim_start();
    let (scheme, params) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case(XMatrix::AUTH_SCHEME) {
        return None;
    }
    // Split on commas outside quoted strings.
    let mut parts = Vec::new();
    let (mut current, mut quoted, mut escaped) = (String::new(), false, false);
    for c in params.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    let mut rebuilt = Vec::new();
    for part in parts {
        let part = part.trim_matches([' ', '\t']);
        if part.is_empty() {
            continue;
        }
        let (name, val) = part.split_once('=')?;
        let (name, val) = (name.trim(), val.trim());
        if val.starts_with('"') {
            rebuilt.push(format!("{name}={val}"));
        } else {
            let escaped = val.replace('\\', "\\\\").replace('"', "\\\"");
            rebuilt.push(format!("{name}=\"{escaped}\""));
        }
    }
    XMatrix::parse(format!("X-Matrix {}", rebuilt.join(","))).ok()
}

fn reject(status: StatusCode, errcode: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"errcode": errcode, "error": message.into()})),
    )
        .into_response()
}

fn unauthorized(message: impl Into<String>) -> Response {
    reject(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", message)
}

impl<S> FromRequest<S> for Signed
where
    Arc<KeyRing>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let ring = Arc::<KeyRing>::from_ref(state);
        let server = ring.server().clone();
        let (parts, body) = req.into_parts();
        let uri = parts
            .extensions
            .get::<OriginalUri>()
            .map(|u| u.0.clone())
            .unwrap_or_else(|| parts.uri.clone());
        let target = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| uri.path().to_owned());

        let raw = axum::body::to_bytes(body, server.config.max_request_body_bytes)
            .await
            .map_err(|_| {
                reject(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "M_TOO_LARGE",
                    "request body too large",
                )
            })?;
        let body =
            if raw.is_empty() {
                None
            } else {
                Some(serde_json::from_slice::<Value>(&raw).map_err(|_| {
                    reject(StatusCode::BAD_REQUEST, "M_NOT_JSON", "body is not JSON")
                })?)
            };

        let headers: Vec<XMatrix> = parts
            .headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .take(MAX_AUTH_HEADERS)
            .filter_map(|v| v.to_str().ok().and_then(parse_x_matrix))
            .collect();
        if headers.is_empty() {
            return Err(unauthorized(
                "missing or malformed X-Matrix Authorization header",
            ));
        }

        let signed = http::Request::builder()
            .method(parts.method.clone())
            .uri(target.as_str())
            .body(&raw[..])
            .map_err(|_| {
                reject(
                    StatusCode::BAD_REQUEST,
                    "M_UNRECOGNIZED",
                    "bad request target",
                )
            })?;
        let ours = &server.server_name;
        let mut last_error = String::new();
        for x in headers {
            if x.destination.as_ref().is_some_and(|d| d != ours) {
                last_error = format!("request is for {:?}, not us", x.destination);
                continue;
            }
            let keys = match ring
                .keys_with(&x.origin, now_ms(), Some(x.key.as_str()))
                .await
            {
                Ok(keys) => keys,
                Err(e) => {
                    last_error = format!("cannot get the keys of {}: {e}", x.origin);
                    continue;
                }
            };
            if !keys.contains_key(x.key.as_str()) {
                last_error = format!("unknown key {} of {}", x.key, x.origin);
                continue;
            }
            let map = PublicKeyMap::from([(x.origin.to_string(), keys)]);
            match x.verify_http_request(&signed, ours, &map) {
                Ok(()) => {
                    return Ok(Signed {
                        origin: x.origin,
                        body,
                        raw,
                    })
                }
                Err(e) => last_error = format!("signature of {} does not verify: {e}", x.origin),
            }
        }
        tracing::debug!(%target, "federation request refused: {last_error}");
        Err(unauthorized(last_error))
    }
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, routing::put, Router};
    use myelin_core::{ruma::ServerName, Server};
    use tower::ServiceExt;

    use super::*;
    use crate::{client::x_matrix_header, client::FederationClient};

    async fn echo(signed: Signed) -> Json<Value> {
        Json(json!({"origin": signed.origin}))
    }

    async fn call(app: &Router, auth: Option<String>, body: &'static str) -> (u16, Value) {
        let mut req = http::Request::builder()
            .method("PUT")
            .uri("/_matrix/federation/v1/echo/1?x=y");
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn signed_extractor_accepts_and_rejects() {
        let dir = std::env::temp_dir().join(format!("myelin-auth-{}", std::process::id()));
        let config = myelin_core::config::Config {
            server_name: "us.example".into(),
            data_dir: dir.clone(),
            ..Default::default()
        };
        let server = Server::open(config).await.unwrap();
        let client = Arc::new(FederationClient::new(server.clone()).unwrap());
        let ring = Arc::new(KeyRing::new(server.clone(), client));
        let app = Router::new()
            .route("/_matrix/federation/v1/echo/{x}", put(echo))
            .with_state(ring);
        let sign = |dest: &str, target: &str, body: &[u8]| {
            // Signed by ourselves, whose keys need no fetch.
            x_matrix_header(
                &server.server_name,
                <&ServerName>::try_from(dest).unwrap(),
                &server.key.pair,
                &http::Method::PUT,
                target,
                body,
            )
            .unwrap()
        };
        let target = "/_matrix/federation/v1/echo/1?x=y";

        let ok = sign("us.example", target, br#"{"a":1}"#);
        let (status, body) = call(&app, Some(ok.clone()), r#"{"a": 1}"#).await;
        assert_eq!((status, body["origin"].as_str()), (200, Some("us.example")));

        let (status, body) = call(&app, None, "{}").await;
        assert_eq!(
            (status, body["errcode"].as_str()),
            (401, Some("M_UNAUTHORIZED"))
        );
        let (status, body) = call(&app, Some(ok), r#"{"a":2}"#).await;
        assert_eq!(
            (status, body["errcode"].as_str()),
            (401, Some("M_UNAUTHORIZED"))
        );
        let elsewhere = sign("them.example", target, br#"{"a":1}"#);
        let (status, _) = call(&app, Some(elsewhere), r#"{"a":1}"#).await;
        assert_eq!(status, 401);
        let wrong_target = sign("us.example", "/_matrix/federation/v1/echo/1", br#"{"a":1}"#);
        let (status, _) = call(&app, Some(wrong_target), r#"{"a":1}"#).await;
        assert_eq!(status, 401);
        let not_json = sign("us.example", target, b"");
        let (status, body) = call(&app, Some(not_json), "nope").await;
        assert_eq!(
            (status, body["errcode"].as_str()),
            (400, Some("M_NOT_JSON"))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn lenient_x_matrix_parsing() {
        let x = parse_x_matrix(
            "X-Matrix KEY=ed25519:k1 , Sig=\"abc+/d\",origin=a.example:8448,unknown=1,destination=\"b.example\"",
        )
        .unwrap();
        assert_eq!(x.origin.as_str(), "a.example:8448");
        assert_eq!(x.key.as_str(), "ed25519:k1");
        assert_eq!(
            x.destination.as_ref().map(|d| d.as_str()),
            Some("b.example")
        );
        let x = parse_x_matrix(
            "x-matrix origin=\"a.example\",destination=\"b.example\",key=\"ed25519:k1\",sig=\"abcd\"",
        )
        .unwrap();
        assert!(x.destination.is_some());
        let x = parse_x_matrix("X-Matrix origin=a.example,key=\"ed25519:k1\",sig=abcd").unwrap();
        assert!(x.destination.is_none());
        assert!(parse_x_matrix("Bearer abc").is_none());
        assert!(parse_x_matrix("X-Matrix origin=a.example").is_none());
    }
}
