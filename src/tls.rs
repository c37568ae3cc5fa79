//! The TLS federation listener: serves an axum `Router` over rustls (TLS 1.2 and 1.3, ALPN `h2`
//! and `http/1.1`; a peer that sends no ALPN gets HTTP/1.1, and one that sends no SNI — Synapse
//! talking to an IP-literal server name — gets the one certificate regardless).
//!
//! The certificate is `tls_certificate`/`tls_private_key`, or else a self-signed one for the
//! server name's host, made once as `<data_dir>/tls.crt` and `tls.key` and reused.

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{anyhow, Context};
use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use myelin_core::config::Config;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Time a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time open connections get to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` over TLS on `addr` until `shutdown` completes, then lets open connections
/// finish (up to 30 s). Errors when the certificate cannot be had or `addr` cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let tls = server_config(config)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow!("option `federation_listen`: cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, "federation (TLS) is listening");
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!("federation listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, "federation connection ended: {e}");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("federation listener: connections still open after {DRAIN_TIMEOUT:?}");
        }
    }
    Ok(())
}

/// The rustls server configuration: TLS 1.2 and 1.3, one certificate, ALPN h2 and http/1.1.
pub fn server_config(config: &Config) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (certs, key) = match (&config.tls_certificate, &config.tls_private_key) {
        (Some(cert), Some(key)) => (load_certs(cert)?, load_key(key)?),
        _ => self_signed(config)?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow!("option `tls_certificate`: certificate and key do not fit: {e}"))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("option `tls_certificate`: {}: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "option `tls_certificate`: {} holds no certificate",
            path.display()
        );
    }
    Ok(certs)
}

fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow!("option `tls_private_key`: {}: {e}", path.display()))
}

/// `<data_dir>/tls.crt` and `tls.key`, made on first use: a self-signed certificate for the
/// server name's host (an IP SAN for an IP literal).
fn self_signed(
    config: &Config,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let cert_path = config.data_dir.join("tls.crt");
    let key_path = config.data_dir.join("tls.key");
    if !(cert_path.exists() && key_path.exists()) {
        let name = myelin_core::ruma::ServerName::parse(&config.server_name)
            .map_err(|e| anyhow!("option `server_name`: {e}"))?;
        let host = name.host().trim_start_matches('[').trim_end_matches(']');
        let generated = rcgen::generate_simple_self_signed(vec![host.to_owned()])
            .map_err(|e| anyhow!("making a self-signed certificate for {host}: {e}"))?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        write_private(&key_path, generated.signing_key.serialize_pem().as_bytes())
            .with_context(|| format!("writing {}", key_path.display()))?;
        std::fs::write(&cert_path, generated.cert.pem())
            .with_context(|| format!("writing {}", cert_path.display()))?;
        tracing::info!(
            "made a self-signed TLS certificate for {host} in {}",
            cert_path.display()
        );
    }
    Ok((load_certs(&cert_path)?, load_key(&key_path)?))
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_is_made_once() {
        let dir = std::env::temp_dir().join(format!("myelin-tls-{}", std::process::id()));
        let config = Config {
            server_name: "127.0.0.1:8448".into(),
            data_dir: dir.clone(),
            ..Config::default()
        };
        server_config(&config).unwrap();
        let first = std::fs::read(dir.join("tls.crt")).unwrap();
        server_config(&config).unwrap();
        assert_eq!(std::fs::read(dir.join("tls.crt")).unwrap(), first);
        std::fs::remove_dir_all(dir).unwrap();
    }

    use axum::{extract::FromRef, http::Method, routing::put, Json};
    use myelin_core::Server;
    use myelin_federation::{
        auth::Signed, client::FederationClient, key_server::key_routes, keyring::KeyRing,
    };
    use serde_json::{json, Value};

    #[derive(Clone)]
    struct Fed {
        server: Arc<Server>,
        ring: Arc<KeyRing>,
    }
    impl FromRef<Fed> for Arc<Server> {
        fn from_ref(f: &Fed) -> Self {
            f.server.clone()
        }
    }
    impl FromRef<Fed> for Arc<KeyRing> {
        fn from_ref(f: &Fed) -> Self {
            f.ring.clone()
        }
    }

    async fn echo(signed: Signed) -> Json<Value> {
        Json(json!({"origin": signed.origin, "body": signed.body}))
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn start(port: u16, tag: &str) -> (Arc<Server>, Arc<FederationClient>) {
        let dir = std::env::temp_dir().join(format!("myelin-fed-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = Config {
            server_name: format!("127.0.0.1:{port}"),
            data_dir: dir,
            federation_verify_tls: false,
            federation_allow_private_addresses: true,
            ..Config::default()
        };
        let server = Server::open(config.clone()).await.unwrap();
        let client = Arc::new(FederationClient::new(server.clone()).unwrap());
        let ring = Arc::new(KeyRing::new(server.clone(), client.clone()));
        let router = key_routes()
            .route("/_matrix/federation/v1/echo/{x}", put(echo))
            .with_state(Fed {
                server: server.clone(),
                ring,
            });
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        tokio::spawn(async move {
            serve(addr, router, &config, std::future::pending::<()>())
                .await
                .unwrap()
        });
        (server, client)
    }

    /// Two servers over real TLS: a signed request verified with keys fetched from the sender,
    /// an unsigned one refused, a notary answer signed twice, and the SSRF guard.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_servers_federate_over_tls() {
        let (pa, pb) = (free_port(), free_port());
        let (a, _) = start(pa, "a").await;
        let (b, b_client) = start(pb, "b").await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        let body = json!({"hello": "world"});
        let answer = b_client
            .request(
                &a.server_name,
                Method::PUT,
                "/_matrix/federation/v1/echo/1?x=y",
                Some(&body),
            )
            .await
            .unwrap();
        assert_eq!(answer["origin"], json!(b.server_name));
        assert_eq!(answer["body"], body);

        let refused = b_client
            .get_unauthenticated(&a.server_name, "/_matrix/federation/v1/echo/1")
            .await
            .unwrap_err();
        assert_eq!(refused.status(), Some(405)); // GET is not routed

        // Notary: A vouches for B's keys (fetched and cached when A verified B's request).
        let notary = b_client
            .request(
                &a.server_name,
                Method::POST,
                "/_matrix/key/v2/query",
                Some(&json!({"server_keys": {b.server_name.as_str(): {}}})),
            )
            .await
            .unwrap();
        let keys = &notary["server_keys"][0];
        assert_eq!(keys["server_name"], json!(b.server_name));
        assert!(keys["signatures"][a.server_name.as_str()].is_object());
        assert!(keys["signatures"][b.server_name.as_str()].is_object());

        // The SSRF guard refuses loopback unless allowed.
        let guarded = Config {
            server_name: "guarded.example".into(),
            data_dir: std::env::temp_dir().join(format!("myelin-fed-guard-{}", std::process::id())),
            ..Config::default()
        };
        let g = Server::open(guarded).await.unwrap();
        let g_client = FederationClient::new(g.clone()).unwrap();
        let e = g_client
            .get_unauthenticated(&a.server_name, "/_matrix/key/v2/server")
            .await
            .unwrap_err();
        assert!(
            matches!(e, myelin_federation::client::FedError::Forbidden { .. }),
            "{e}"
        );
        for s in [&a, &b, &g] {
            let _ = std::fs::remove_dir_all(&s.config.data_dir);
        }
    }
}
