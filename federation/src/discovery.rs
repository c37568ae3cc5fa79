//! Server discovery: from a server name to where its federation API is reached, as the spec's
//! "Resolving server names" (server-server API, v1.19) describes — IP literals, explicit ports,
//! `/.well-known/matrix/server` delegation, `_matrix-fed._tcp` and the deprecated `_matrix._tcp`
//! SRV records, and the 8448 fallback. Also the SSRF guard: which IP addresses outbound
//! federation may connect to, and a `reqwest` DNS resolver that enforces it.
//!
//! A resolution is a [`Destination`]: the host in the request URL (the name the TLS certificate
//! must match, sent as SNI unless it is an IP), whether the URL carries an explicit port, what
//! the `Host` header says and which `(host, port)` targets to connect to. When the URL has no
//! port, the federation client's resolver ([`GuardedResolver`]) maps the URL host to the
//! targets (SRV or 8448), so certificate name and `Host` stay the delegated name while the
//! connection goes where SRV points.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_resolver::{
    config::{ResolverConfig, ResolverOpts},
    name_server::TokioConnectionProvider,
    TokioResolver,
};
use myelin_core::ruma::{OwnedServerName, ServerName};

/// Default federation port.
pub const DEFAULT_PORT: u16 = 8448;
/// How long a resolution based on a valid `.well-known` response is kept when the response
/// carries no cache headers (the spec's recommended default).
const WELL_KNOWN_DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Upper bound on a `.well-known` cache lifetime (the spec recommends 48 h).
const WELL_KNOWN_MAX_TTL: Duration = Duration::from_secs(48 * 60 * 60);
/// How long a resolution made after a failed `.well-known` lookup is kept.
const WELL_KNOWN_ERROR_TTL: Duration = Duration::from_secs(5 * 60);
/// Resolutions that need no lookup (IP literals, explicit ports) are kept this long.
const STATIC_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Largest `.well-known` response read.
const WELL_KNOWN_MAX_BYTES: usize = 64 * 1024;
/// Most server names whose resolution is cached.
const CACHE_CAPACITY: usize = 10_000;

// SSRF guard -------------------------------------------------------------------------------------

/// Whether outbound federation may connect to `ip` while private addresses are not allowed:
/// false for loopback, private (RFC 1918, fc00::/7), link-local, unspecified, broadcast, CGNAT
/// (100.64/10), multicast, documentation, benchmarking and reserved ranges, also when embedded in
/// an IPv4-mapped or NAT64 IPv6 address.
pub fn is_public_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || a == 0 // "this network"
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || (a == 100 && (b & 0xc0) == 64) // CGNAT 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments 192.0.0.0/24
        || (a == 198 && (b & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || a >= 240) // reserved 240.0.0.0/4
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    // NAT64 well-known prefix 64:ff9b::/96 carries an IPv4 address.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return is_public_v4(Ipv4Addr::new(a, b, c, d));
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation 2001:db8::/32
        || s[0..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible (deprecated) ::/96
}

/// The error a [`GuardedResolver`] reports when every address of a name is refused by the SSRF
/// guard; the client finds it in the error chain and reports [`crate::client::FedError::Forbidden`].
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to non-public addresses ({addrs}), refused by the SSRF guard")]
pub struct Refused {
    pub host: String,
    pub addrs: String,
}

/// Parses an IP literal host (`1.2.3.4` or `[::1]`).
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    let inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    inner.parse().ok()
}

// Resolver ---------------------------------------------------------------------------------------

/// `(host, port)` targets and until when they hold.
type Route = (Vec<(String, u16)>, Instant);

/// DNS lookups for federation: A/AAAA through hickory, filtered by the SSRF guard, with the
/// URL-host → target mapping that SRV discovery fills. Used as `reqwest`'s resolver.
#[derive(Clone)]
pub struct GuardedResolver {
    dns: TokioResolver,
    allow_private: bool,
    /// URL host → `(host, port)` targets to connect to instead (for URLs without a port).
    routes: Arc<Mutex<HashMap<String, Route>>>,
}

impl GuardedResolver {
    /// A resolver from the system's DNS configuration (or public defaults when there is none).
    pub fn new(allow_private: bool) -> Self {
        let dns = match TokioResolver::builder_tokio() {
            Ok(b) => b.build(),
            Err(e) => {
                tracing::warn!("no usable system DNS configuration ({e}); using defaults");
                let mut b = TokioResolver::builder_with_config(
                    ResolverConfig::default(),
                    TokioConnectionProvider::default(),
                );
                *b.options_mut() = ResolverOpts::default();
                b.build()
            }
        };
        GuardedResolver {
            dns,
            allow_private,
            routes: Arc::default(),
        }
    }

    /// Whether `ip` may be connected to under this resolver's policy.
    pub fn allowed(&self, ip: IpAddr) -> bool {
        self.allow_private || is_public_ip(ip)
    }

    fn set_route(&self, url_host: &str, targets: Vec<(String, u16)>, ttl: Duration) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.len() >= CACHE_CAPACITY {
            let now = Instant::now();
            routes.retain(|_, (_, expiry)| *expiry > now);
            if routes.len() >= CACHE_CAPACITY {
                routes.clear();
            }
        }
        routes.insert(url_host.to_owned(), (targets, Instant::now() + ttl));
    }

    fn route(&self, url_host: &str) -> Option<Vec<(String, u16)>> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        // An expired route is still better than none: discovery refreshes it on the next request.
        routes.get(url_host).map(|(t, _)| t.clone())
    }

    /// Resolves `(host, port)` targets to socket addresses, dropping refused ones. An error when
    /// nothing is left (a [`Refused`] when only the guard removed addresses).
    pub async fn lookup(
        &self,
        targets: &[(String, u16)],
    ) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
        let mut out = Vec::new();
        let mut refused = Vec::new();
        let mut last_error = None;
        for (host, port) in targets {
            let ips: Vec<IpAddr> = match ip_literal(host) {
                Some(ip) => vec![ip],
                None => match self.dns.lookup_ip(host.as_str()).await {
                    Ok(found) => found.iter().collect(),
                    Err(e) => {
                        last_error = Some(format!("{host}: {e}"));
                        continue;
                    }
                },
            };
            for ip in ips {
                if self.allowed(ip) {
                    out.push(SocketAddr::new(ip, *port));
                } else {
                    refused.push(ip.to_string());
                }
            }
        }
        if !out.is_empty() {
            return Ok(out);
        }
        if !refused.is_empty() {
            let host = targets.first().map(|t| t.0.clone()).unwrap_or_default();
            return Err(Box::new(Refused {
                host,
                addrs: refused.join(", "),
            }));
        }
        Err(last_error
            .unwrap_or_else(|| "no addresses found".to_owned())
            .into())
    }

    /// SRV targets of `_matrix-fed._tcp.<host>`, else `_matrix._tcp.<host>`, ordered by
    /// priority then weight (highest first). Empty when there are none.
    async fn srv_targets(&self, host: &str) -> Vec<(String, u16)> {
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            let name = format!("{service}.{host}.");
            let Ok(found) = self.dns.srv_lookup(name.as_str()).await else {
                continue;
            };
            let mut records: Vec<_> = found.iter().collect();
            records.sort_by_key(|r| (r.priority(), std::cmp::Reverse(r.weight())));
            let targets: Vec<(String, u16)> = records
                .into_iter()
                .filter_map(|r| {
                    let target = r.target().to_utf8();
                    let target = target.trim_end_matches('.');
                    // A target of "." means "no service here".
                    (!target.is_empty()).then(|| (target.to_owned(), r.port()))
                })
                .collect();
            if !targets.is_empty() {
                return targets;
            }
        }
        Vec::new()
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: the URL's port (or 443) is used; a routed target brings its own port.
            let targets = this.route(&host).unwrap_or_else(|| vec![(host, 0)]);
            let addrs = this.lookup(&targets).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

// Discovery --------------------------------------------------------------------------------------

/// Where requests for one server name go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The host in the request URL: the name the certificate must be valid for and the SNI
    /// (none for an IP literal). IPv6 literals without brackets.
    pub tls_host: String,
    /// The port written in the URL, if any. Without one, the connection goes to `targets`.
    pub url_port: Option<u16>,
    /// The `Host` header to send.
    pub host_header: String,
    /// What to connect to: `(host or IP, port)` in order of preference.
    pub targets: Vec<(String, u16)>,
}

impl Destination {
    /// `https://host[:port]` for this destination.
    pub fn base_url(&self) -> String {
        let host = match self.tls_host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => self.tls_host.clone(),
        };
        match self.url_port {
            Some(port) => format!("https://{host}:{port}"),
            None => format!("https://{host}"),
        }
    }

    /// A destination reached directly at `host:port` (IP literal or explicit port).
    fn direct(host: &str, port: u16, host_header: String) -> Self {
        let bare = ip_literal(host)
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| host.to_owned());
        Destination {
            tls_host: bare.clone(),
            url_port: Some(port),
            host_header,
            targets: vec![(bare, port)],
        }
    }
}

/// Steps 1 and 2 of the spec: the resolution of a server name that needs no lookup (an IP
/// literal, or a hostname with an explicit port), else `None`.
pub fn resolve_static(name: &ServerName) -> Option<Destination> {
    let host = name.host();
    if name.is_ip_literal() {
        return Some(Destination::direct(
            host,
            name.port().unwrap_or(DEFAULT_PORT),
            name.as_str().to_owned(),
        ));
    }
    name.port()
        .map(|port| Destination::direct(host, port, name.as_str().to_owned()))
}

/// Resolves server names, caching the results (bounded, in memory).
pub struct Discovery {
    resolver: GuardedResolver,
    /// Client for `/.well-known/matrix/server` (ordinary HTTPS on port 443).
    well_known: reqwest::Client,
    cache: Mutex<HashMap<OwnedServerName, (Destination, Instant)>>,
}

impl Discovery {
    /// `resolver` must be the one the federation client uses, so that SRV routes reach it;
    /// `well_known` is a client for plain HTTPS lookups.
    pub fn new(resolver: GuardedResolver, well_known: reqwest::Client) -> Self {
        Discovery {
            resolver,
            well_known,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Where requests for `name` go (cached).
    pub async fn resolve(&self, name: &ServerName) -> Destination {
        if let Some(dest) = resolve_static(name) {
            return dest;
        }
        if let Some((dest, expiry)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            if *expiry > Instant::now() {
                return dest.clone();
            }
        }
        let (dest, ttl) = self.resolve_uncached(name).await;
        if dest.url_port.is_none() {
            self.resolver
                .set_route(&dest.tls_host, dest.targets.clone(), ttl);
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            let now = Instant::now();
            cache.retain(|_, (_, expiry)| *expiry > now);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(name.to_owned(), (dest.clone(), Instant::now() + ttl));
        dest
    }

    /// Forgets the cached resolution of `name` (e.g. after its target proved unreachable).
    pub fn forget(&self, name: &ServerName) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    async fn resolve_uncached(&self, name: &ServerName) -> (Destination, Duration) {
        let host = name.host();
        match self.fetch_well_known(host).await {
            Ok((delegated, ttl)) => {
                tracing::debug!(server = %name, %delegated, "delegated by .well-known");
                // Step 3.1 and 3.2: IP literal or explicit port.
                if let Some(dest) = resolve_static(&delegated) {
                    return (dest, ttl.min(STATIC_TTL));
                }
                // Steps 3.3 to 3.5: SRV, then 8448, for the delegated hostname.
                (self.srv_or_default(delegated.host()).await, ttl)
            }
            Err(e) => {
                tracing::debug!(server = %name, "no usable .well-known: {e}");
                // Steps 4 to 6.
                (self.srv_or_default(host).await, WELL_KNOWN_ERROR_TTL)
            }
        }
    }

    async fn srv_or_default(&self, host: &str) -> Destination {
        let mut targets = self.resolver.srv_targets(host).await;
        if targets.is_empty() {
            targets.push((host.to_owned(), DEFAULT_PORT));
        }
        Destination {
            tls_host: host.to_owned(),
            url_port: None,
            host_header: host.to_owned(),
            targets,
        }
    }

    /// `GET https://<host>/.well-known/matrix/server` → the delegated server name and how long
    /// to keep it.
    async fn fetch_well_known(&self, host: &str) -> Result<(OwnedServerName, Duration), String> {
        let url = format!("https://{host}/.well-known/matrix/server");
        let mut resp = self
            .well_known
            .get(&url)
            .send()
            .await
            .map_err(|e| crate::client::error_chain(&e))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(format!("status {}", resp.status()));
        }
        let ttl = cache_ttl(resp.headers());
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > WELL_KNOWN_MAX_BYTES {
                return Err("response too large".to_owned());
            }
            body.extend_from_slice(&chunk);
        }
        let json: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("bad JSON: {e}"))?;
        let server = json
            .get("m.server")
            .and_then(|v| v.as_str())
            .ok_or("no m.server string")?;
        let delegated =
            OwnedServerName::try_from(server).map_err(|e| format!("bad m.server: {e}"))?;
        Ok((delegated, ttl))
    }
}

/// The cache lifetime a `.well-known` response asks for (`Cache-Control: max-age`, or none for
/// `no-store`/`no-cache`), bounded; the default when it says nothing.
fn cache_ttl(headers: &reqwest::header::HeaderMap) -> Duration {
    let Some(value) = headers
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
    else {
        return WELL_KNOWN_DEFAULT_TTL;
    };
    for directive in value.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Duration::ZERO;
        }
        if let Some(age) = lower.strip_prefix("max-age=") {
            if let Ok(secs) = age.trim_matches('"').parse::<u64>() {
                return Duration::from_secs(secs).min(WELL_KNOWN_MAX_TTL);
            }
        }
    }
    WELL_KNOWN_DEFAULT_TTL
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> OwnedServerName {
        OwnedServerName::try_from(s).unwrap()
    }

    #[test]
    fn ip_literals_and_explicit_ports_need_no_lookup() {
        let d = resolve_static(&name("1.2.3.4")).unwrap();
        assert_eq!(d.base_url(), "https://1.2.3.4:8448");
        assert_eq!(d.host_header, "1.2.3.4");
        assert_eq!(d.targets, vec![("1.2.3.4".to_owned(), 8448)]);

        let d = resolve_static(&name("1.2.3.4:9000")).unwrap();
        assert_eq!(d.base_url(), "https://1.2.3.4:9000");
        assert_eq!(d.host_header, "1.2.3.4:9000");

        let d = resolve_static(&name("[2001:db8::1]")).unwrap();
        assert_eq!(d.tls_host, "2001:db8::1");
        assert_eq!(d.base_url(), "https://[2001:db8::1]:8448");
        assert_eq!(d.host_header, "[2001:db8::1]");

        let d = resolve_static(&name("[::1]:8449")).unwrap();
        assert_eq!(d.base_url(), "https://[::1]:8449");
        assert_eq!(d.host_header, "[::1]:8449");

        let d = resolve_static(&name("example.org:8449")).unwrap();
        assert_eq!(d.base_url(), "https://example.org:8449");
        assert_eq!(d.tls_host, "example.org");
        assert_eq!(d.host_header, "example.org:8449");
        assert_eq!(d.targets, vec![("example.org".to_owned(), 8449)]);

        assert!(resolve_static(&name("example.org")).is_none());
    }

    #[test]
    fn ssrf_classification() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "100.64.0.1",
            "100.127.255.254",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2001:db8::1",
        ] {
            assert!(!is_public_ip(bad.parse().unwrap()), "{bad} must be refused");
        }
        for good in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(
                is_public_ip(good.parse().unwrap()),
                "{good} must be allowed"
            );
        }
    }

    #[test]
    fn well_known_cache_lifetime() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(cache_ttl(&h), WELL_KNOWN_DEFAULT_TTL);
        h.insert("cache-control", "public, max-age=600".parse().unwrap());
        assert_eq!(cache_ttl(&h), Duration::from_secs(600));
        h.insert("cache-control", "max-age=99999999".parse().unwrap());
        assert_eq!(cache_ttl(&h), WELL_KNOWN_MAX_TTL);
        h.insert("cache-control", "no-store".parse().unwrap());
        assert_eq!(cache_ttl(&h), Duration::ZERO);
    }

    #[tokio::test]
    async fn guarded_resolver_refuses_private_literals() {
        let r = GuardedResolver::new(false);
        let e = r.lookup(&[("127.0.0.1".into(), 8448)]).await.unwrap_err();
        assert!(e.downcast_ref::<Refused>().is_some(), "{e}");
        let ok = r.lookup(&[("8.8.8.8".into(), 8448)]).await.unwrap();
        assert_eq!(ok, vec!["8.8.8.8:8448".parse().unwrap()]);
        let r = GuardedResolver::new(true);
        assert!(r.lookup(&[("127.0.0.1".into(), 8448)]).await.is_ok());
    }
}
