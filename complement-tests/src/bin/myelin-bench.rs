//! `myelin-bench`: the load and latency benchmark for a running Myelin server.
//!
//! This binary owns the benchmark scenarios (send→sync latency, send
//! throughput, sync fan-out, long-poll memory, initial sync cost, room
//! creation/join rates), its small Matrix Client-Server HTTP helper built on
//! `reqwest`, the statistics it reports, and its output: one human line per
//! scenario on stdout and, at the end, one JSON object with every figure
//! (also written to `--json-out FILE` when given).
//!
//! It talks to the server over HTTP only, and only to loopback addresses.
//! Every request loop is bounded in count and in time, so the program always
//! exits by itself.
//!
//! ```text
//! cargo run --release -p complement-tests --bin myelin-bench -- \
//!     --url http://127.0.0.1:8008 [--server-pid PID] [--only NAME[,NAME]] \
//!     [--duration-secs 20] [--json-out FILE]
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use complement_tests::bench::{ms, round3, Stats};
use futures::stream::{self, StreamExt, TryStreamExt};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

/// All scenario names, in the order they run.
const SCENARIOS: [&str; 6] = [
    "send_sync_latency",
    "send_throughput",
    "fanout",
    "longpoll_memory",
    "initial_sync",
    "room_rates",
];

/// Password given to every benchmark account.
const PASSWORD: &str = "myelin-bench-password";
/// Prefix of every Client-Server API path used here.
const CS: &str = "/_matrix/client/v3";
/// Time limit of an ordinary (non long-poll) request.
const REQ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    name = "myelin-bench",
    about = "Benchmarks a running Myelin (Matrix) server over the Client-Server API"
)]
struct Args {
    /// Base URL of the server; must be a loopback address.
    #[arg(long, default_value = "http://127.0.0.1:8008")]
    url: String,
    /// PID of the server process (needed by `longpoll_memory` and for RSS figures).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Run only these scenarios (comma separated, or repeat the flag).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// How long `send_throughput` sends for, in seconds.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Also write the final JSON object (pretty-printed) to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Measured iterations of `send_sync_latency`.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Users of `send_throughput` (each joined to every throughput room).
    #[arg(long, default_value_t = 20)]
    throughput_users: usize,
    /// Rooms of `send_throughput`; one sender loop per (user, room).
    #[arg(long, default_value_t = 5)]
    throughput_rooms: usize,
    /// Room size of `fanout` (every member long-polls).
    #[arg(long, default_value_t = 100)]
    fanout_members: usize,
    /// Rounds (sends) of `fanout`.
    #[arg(long, default_value_t = 20)]
    fanout_rounds: usize,
    /// Long-polls held at once by `longpoll_memory`, one per device.
    #[arg(long, default_value_t = 1000)]
    longpolls: usize,
    /// Users that those devices are spread over.
    #[arg(long, default_value_t = 50)]
    longpoll_users: usize,
    /// Spread the long-polls over distinct devices (`--longpoll-users` users, logging each in
    /// repeatedly). By default all polls use one device, so that the memory of 1,000 password
    /// hashes (which the allocator returns only gradually) does not blur the figure.
    #[arg(long)]
    longpoll_distinct_devices: bool,
    /// Rooms of the `initial_sync` user.
    #[arg(long, default_value_t = 50)]
    initial_rooms: usize,
    /// Messages sent into each of those rooms.
    #[arg(long, default_value_t = 50)]
    initial_messages: usize,
    /// Rooms created (preset private_chat) by `room_rates`.
    #[arg(long, default_value_t = 200)]
    create_rooms: usize,
    /// Public rooms that `room_rates` joins into.
    #[arg(long, default_value_t = 50)]
    join_rooms: usize,
    /// Users joining each of those public rooms.
    #[arg(long, default_value_t = 10)]
    joiners: usize,
    /// Concurrency of measured rate loops and of setup work.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

// ---------------------------------------------------------------------------
// HTTP helper
// ---------------------------------------------------------------------------

/// One logged-in device.
#[derive(Clone, Debug)]
struct Session {
    user_id: String,
    localpart: String,
    token: Arc<str>,
}

/// Thin Client-Server API client; cheap to clone (one shared connection pool).
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: Arc<str>,
    run_id: Arc<str>,
    txn: Arc<AtomicU64>,
}

#[derive(Deserialize)]
struct SyncHead {
    next_batch: String,
}

/// Percent-encodes a path segment (room and user IDs).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

impl Api {
    fn new(base: &str, run_id: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .http1_only()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(4096)
            .pool_idle_timeout(Duration::from_secs(120))
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            http,
            base: base.trim_end_matches('/').into(),
            run_id: run_id.into(),
            txn: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A transaction ID unique within this run.
    fn txn_id(&self) -> String {
        format!(
            "{}-{}",
            self.run_id,
            self.txn.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Sends a request; returns status and parsed JSON body (`Null` if empty
    /// or not JSON). Transport errors are errors; HTTP errors are not.
    async fn call_raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value, Bytes)> {
        let url = format!("{}{CS}{path}", self.base);
        let mut rb = self.http.request(method.clone(), url).timeout(REQ_TIMEOUT);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("{method} {path}: reading body"))?;
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, v, bytes))
    }

    /// Like [`Api::call_raw`] but any non-2xx status is an error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value> {
        let (status, v, bytes) = self.call_raw(method.clone(), path, token, body).await?;
        if !status.is_success() {
            bail!("{method} {path} -> {status}: {}", snippet(&bytes));
        }
        Ok(v)
    }

    /// [`Api::call_raw`], retried (at most 10 times) while the server
    /// answers 429, honouring `retry_after_ms`. Used for account setup only:
    /// measured loops count a 429 as an error.
    async fn call_setup(
        &self,
        method: Method,
        path: &str,
        body: &Value,
    ) -> Result<(StatusCode, Value, Bytes)> {
        let mut attempt = 0;
        loop {
            let r = self
                .call_raw(method.clone(), path, None, Some(body))
                .await?;
            attempt += 1;
            if r.0 != StatusCode::TOO_MANY_REQUESTS || attempt >= 10 {
                return Ok(r);
            }
            let wait = r.1["retry_after_ms"]
                .as_u64()
                .unwrap_or(500)
                .clamp(10, 5000);
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }

    fn session_from(v: &Value, localpart: &str) -> Result<Session> {
        let token = v["access_token"]
            .as_str()
            .ok_or_else(|| anyhow!("no access_token in {v}"))?;
        let user_id = v["user_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no user_id in {v}"))?;
        Ok(Session {
            user_id: user_id.to_owned(),
            localpart: localpart.to_owned(),
            token: token.into(),
        })
    }

    /// Registers `localpart` through the dummy user-interactive auth flow.
    async fn register(&self, localpart: &str) -> Result<Session> {
        let mut body = json!({
            "username": localpart,
            "password": PASSWORD,
            "initial_device_display_name": "myelin-bench",
        });
        let (status, v, bytes) = self.call_setup(Method::POST, "/register", &body).await?;
        let v = if status.is_success() {
            v
        } else if status == StatusCode::UNAUTHORIZED {
            let mut auth = json!({ "type": "m.login.dummy" });
            if let Some(s) = v["session"].as_str() {
                auth["session"] = json!(s);
            }
            body["auth"] = auth;
            let (status, v, bytes) = self.call_setup(Method::POST, "/register", &body).await?;
            if !status.is_success() {
                bail!(
                    "POST /register ({localpart}, dummy auth) -> {status}: {}",
                    snippet(&bytes)
                );
            }
            v
        } else {
            bail!(
                "POST /register ({localpart}) -> {status}: {}",
                snippet(&bytes)
            );
        };
        Self::session_from(&v, localpart)
    }

    /// Logs `localpart` in with its password: a new device.
    async fn login(&self, localpart: &str) -> Result<Session> {
        let body = json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": localpart },
            "password": PASSWORD,
            "initial_device_display_name": "myelin-bench",
        });
        let (status, v, bytes) = self.call_setup(Method::POST, "/login", &body).await?;
        if !status.is_success() {
            bail!("POST /login ({localpart}) -> {status}: {}", snippet(&bytes));
        }
        Self::session_from(&v, localpart)
    }

    /// Registers `n` users named `mb_<run>_<tag>_<i>`, `conc` at a time.
    async fn register_many(&self, tag: &str, n: usize, conc: usize) -> Result<Vec<Session>> {
        let names: Vec<String> = (0..n)
            .map(|i| format!("mb_{}_{tag}_{i}", self.run_id))
            .collect();
        stream::iter(names.iter())
            .map(|name| self.register(name))
            .buffered(conc.max(1))
            .try_collect()
            .await
    }

    async fn create_room(&self, s: &Session, preset: &str) -> Result<String> {
        let v = self
            .call(
                Method::POST,
                "/createRoom",
                Some(&s.token),
                Some(&json!({ "preset": preset })),
            )
            .await?;
        v["room_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("createRoom: no room_id in {v}"))
    }

    async fn join(&self, s: &Session, room: &str) -> Result<()> {
        let path = format!("/rooms/{}/join", enc(room));
        self.call(Method::POST, &path, Some(&s.token), Some(&json!({})))
            .await?;
        Ok(())
    }

    /// Joins every session in `users` to `room`, `conc` at a time.
    async fn join_all(&self, users: &[Session], room: &str, conc: usize) -> Result<()> {
        stream::iter(users.iter())
            .map(|u| self.join(u, room))
            .buffer_unordered(conc.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn send_text(&self, s: &Session, room: &str, text: &str) -> Result<()> {
        let path = format!("/rooms/{}/send/m.room.message/{}", enc(room), self.txn_id());
        self.call(
            Method::PUT,
            &path,
            Some(&s.token),
            Some(&json!({ "msgtype": "m.text", "body": text })),
        )
        .await?;
        Ok(())
    }

    /// One `/sync` request; returns the raw body and the instant it had
    /// fully arrived.
    async fn sync(
        &self,
        token: &str,
        since: Option<&str>,
        timeout_ms: u64,
        filter: Option<&str>,
    ) -> Result<(Bytes, Instant)> {
        let timeout = timeout_ms.to_string();
        let mut q: Vec<(&str, &str)> = Vec::with_capacity(3);
        q.push(("timeout", &timeout));
        if let Some(s) = since {
            q.push(("since", s));
        }
        if let Some(f) = filter {
            q.push(("filter", f));
        }
        let resp = self
            .http
            .get(format!("{}{CS}/sync", self.base))
            .query(&q)
            .bearer_auth(token)
            .timeout(Duration::from_millis(timeout_ms) + Duration::from_secs(30))
            .send()
            .await
            .context("GET /sync")?;
        let status = resp.status();
        let body = resp.bytes().await.context("GET /sync: reading body")?;
        let arrived = Instant::now();
        if !status.is_success() {
            bail!("GET /sync -> {status}: {}", snippet(&body));
        }
        Ok((body, arrived))
    }

    /// A sync filter that limits `/sync` to `room`: uploaded if the server
    /// supports filter upload, else inline JSON.
    async fn room_filter(&self, s: &Session, room: &str) -> String {
        let filter = json!({
            "presence": { "types": [] },
            "account_data": { "types": [] },
            "room": {
                "rooms": [room],
                "timeline": { "limit": 10 },
                "state": { "lazy_load_members": true },
                "ephemeral": { "types": [] },
                "account_data": { "types": [] },
            },
        });
        let path = format!("/user/{}/filter", enc(&s.user_id));
        match self
            .call(Method::POST, &path, Some(&s.token), Some(&filter))
            .await
        {
            Ok(v) => match v["filter_id"].as_str() {
                Some(id) => id.to_owned(),
                None => filter.to_string(),
            },
            Err(_) => filter.to_string(),
        }
    }

    /// Initial sync (timeout 0) to obtain a `since` token. If the server
    /// rejects the filter, retries without one and returns `None` as filter.
    async fn initial_since(
        &self,
        s: &Session,
        filter: Option<String>,
    ) -> Result<(String, Option<String>)> {
        match self.sync(&s.token, None, 0, filter.as_deref()).await {
            Ok((body, _)) => Ok((next_batch(&body)?, filter)),
            Err(e) if filter.is_some() => {
                eprintln!("  note: filtered /sync failed ({e:#}); syncing unfiltered");
                let (body, _) = self.sync(&s.token, None, 0, None).await?;
                Ok((next_batch(&body)?, None))
            }
            Err(e) => Err(e),
        }
    }
}

fn next_batch(body: &[u8]) -> Result<String> {
    let head: SyncHead = serde_json::from_slice(body)
        .with_context(|| format!("sync response without next_batch: {}", snippet(body)))?;
    Ok(head.next_batch)
}

/// Aborts the tasks it holds when dropped, so a scenario that fails early
/// leaves no long-polls running behind it.
struct AbortGuard(Vec<tokio::task::AbortHandle>);

impl AbortGuard {
    fn of<T>(handles: &[tokio::task::JoinHandle<T>]) -> Self {
        AbortGuard(handles.iter().map(|h| h.abort_handle()).collect())
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// A device that long-polls `/sync` until a response mentions a nonce.
#[derive(Clone)]
struct Poller {
    api: Api,
    token: Arc<str>,
    filter: Option<Arc<str>>,
}

impl Poller {
    fn new(api: &Api, s: &Session, filter: Option<String>) -> Self {
        Poller {
            api: api.clone(),
            token: s.token.clone(),
            filter: filter.map(Into::into),
        }
    }

    /// Long-polls from `since` (at most 100 polls, at most until `deadline`)
    /// until a response contains `nonce`; returns when that response had
    /// arrived and the new `since`. `in_flight` counts outstanding requests.
    async fn until_nonce(
        &self,
        mut since: String,
        nonce: &[u8],
        timeout_ms: u64,
        deadline: Instant,
        in_flight: Option<&AtomicUsize>,
    ) -> Result<(Instant, String)> {
        let finder = memchr::memmem::Finder::new(nonce);
        let work = async {
            for _ in 0..100 {
                if let Some(c) = in_flight {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                let r = self
                    .api
                    .sync(
                        &self.token,
                        Some(&since),
                        timeout_ms,
                        self.filter.as_deref(),
                    )
                    .await;
                if let Some(c) = in_flight {
                    c.fetch_sub(1, Ordering::SeqCst);
                }
                let (body, arrived) = r?;
                since = next_batch(&body)?;
                if finder.find(&body).is_some() {
                    return Ok((arrived, since));
                }
            }
            bail!("nonce not seen in 100 sync responses")
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| anyhow!("timed out waiting for the event in /sync"))?
    }
}

// ---------------------------------------------------------------------------
// Statistics and reporting
// ---------------------------------------------------------------------------

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// Prints one scenario line: name, figures, target, verdict.
fn human(name: &str, figures: &str, target: &str, ok: bool) {
    println!("{name:<18} {figures}   [target {target}: {}]", verdict(ok));
}

// ---------------------------------------------------------------------------
// Server process inspection (/proc)
// ---------------------------------------------------------------------------

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn rss_kib(pid: u32) -> Result<u64> {
    proc_status_kib(pid, "VmRSS:")
        .ok_or_else(|| anyhow!("cannot read VmRSS from /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

fn fd_soft_limit_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3).map(str::to_owned)
}

/// Raises this process's soft `RLIMIT_NOFILE` towards the hard limit so the
/// bench can hold `want` sockets; returns the resulting soft limit.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < want {
        let new = libc::rlimit {
            rlim_cur: want.min(lim.rlim_max),
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return new.rlim_cur;
        }
    }
    lim.rlim_cur
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

struct Ctx {
    api: Api,
    args: Args,
    idle_rss_kib: Option<u64>,
}

impl Ctx {
    fn nonce(&self, tag: &str, i: usize) -> String {
        format!("nonce-{}-{tag}-{i}-end", self.api.run_id)
    }
}

/// Scenario 1: A sends into a room while B long-polls `/sync`; time until B has it.
async fn send_sync_latency(cx: &Ctx) -> Result<Value> {
    let api = &cx.api;
    let users = api.register_many("ssl", 2, 2).await?;
    let (a, b) = (&users[0], &users[1]);
    let room = api.create_room(a, "public_chat").await?;
    api.join(b, &room).await?;
    let filter = api.room_filter(b, &room).await;
    let (mut since, filter) = api.initial_since(b, Some(filter)).await?;
    let poller = Poller::new(api, b, filter);

    const WARMUP: usize = 5;
    let total = cx.args.iterations + WARMUP;
    let mut lat = Vec::with_capacity(cx.args.iterations);
    let mut send_lat = Vec::with_capacity(cx.args.iterations);
    for i in 0..total {
        let nonce = cx.nonce("ssl", i);
        let p = poller.clone();
        let nb = nonce.clone();
        let since_now = since.clone();
        let deadline = Instant::now() + Duration::from_secs(40);
        let waiter = tokio::spawn(async move {
            p.until_nonce(since_now, nb.as_bytes(), 30_000, deadline, None)
                .await
        });
        let _guard = AbortGuard(vec![waiter.abort_handle()]);
        // Let B's long-poll reach the server before A sends.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t0 = Instant::now();
        api.send_text(a, &room, &nonce).await?;
        let sent = t0.elapsed();
        let (arrived, nb) = waiter.await.context("sync task panicked")??;
        since = nb;
        if i >= WARMUP {
            lat.push(ms(arrived.saturating_duration_since(t0)));
            send_lat.push(ms(sent));
        }
    }
    let st = Stats::new(lat);
    let ok = st.p50 <= 2.0 && st.p99 <= 10.0;
    human(
        "send_sync_latency",
        &format!(
            "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
            st.p50, st.p99, st.max, st.n
        ),
        "p50 ≤2 ms, p99 ≤10 ms",
        ok,
    );
    Ok(json!({
        "latency": st.json(),
        "send_request": Stats::new(send_lat).json(),
        "warmup_iterations": WARMUP,
        "meets_target": ok,
    }))
}

/// Scenario 2: Every (user, room) pair sends in its own loop for `--duration-secs`.
async fn send_throughput(cx: &Ctx) -> Result<Value> {
    let api = &cx.api;
    let conc = cx.args.concurrency;
    let users = api
        .register_many("thr", cx.args.throughput_users, conc)
        .await?;
    let mut rooms = Vec::new();
    for _ in 0..cx.args.throughput_rooms {
        let room = api.create_room(&users[0], "public_chat").await?;
        api.join_all(&users[1..], &room, conc).await?;
        rooms.push(room);
    }
    let dur = Duration::from_secs(cx.args.duration_secs);
    let errors_sample: Arc<Mutex<Vec<String>>> = Arc::default();
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for u in &users {
        for room in &rooms {
            let api = api.clone();
            let token = u.token.clone();
            let path_prefix = format!("/rooms/{}/send/m.room.message/", enc(room));
            let sample = errors_sample.clone();
            tasks.push(tokio::spawn(async move {
                let body = json!({ "msgtype": "m.text", "body": "throughput benchmark message" });
                let mut lat: Vec<f64> = Vec::with_capacity(4096);
                let mut errors = 0u64;
                // Bounded in time by `deadline`; in count as a safety net.
                for _ in 0..10_000_000u64 {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let path = format!("{path_prefix}{}", api.txn_id());
                    let t = Instant::now();
                    match api
                        .call(Method::PUT, &path, Some(&token), Some(&body))
                        .await
                    {
                        Ok(_) => lat.push(ms(t.elapsed())),
                        Err(e) => {
                            errors += 1;
                            {
                                let mut s = sample.lock().unwrap();
                                if s.len() < 5 {
                                    s.push(format!("{e:#}"));
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                (lat, errors)
            }));
        }
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.context("sender task panicked")?;
        all.extend(lat);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let sent = all.len();
    let rate = sent as f64 / elapsed;
    let st = Stats::new(all);
    let ok = rate >= 3000.0 && errors == 0;
    human(
        "send_throughput",
        &format!(
            "{rate:.0} msg/s  ({sent} sent in {elapsed:.1} s, {errors} errors, {} senders)  send p50 {:.2} ms  p99 {:.2} ms",
            users.len() * rooms.len(),
            st.p50,
            st.p99
        ),
        "≥3000 msg/s, 0 errors",
        ok,
    );
    let sample = errors_sample.lock().unwrap().clone();
    Ok(json!({
        "messages_per_sec": (rate * 10.0).round() / 10.0,
        "messages_sent": sent,
        "errors": errors,
        "error_samples": sample,
        "elapsed_s": round3(elapsed),
        "users": users.len(),
        "rooms": rooms.len(),
        "concurrent_senders": users.len() * rooms.len(),
        "send_latency": st.json(),
        "meets_target": ok,
    }))
}

/// Scenario 3: One room of N members all long-polling; one sends; time until the
/// last member's sync carrying the event has returned.
async fn fanout(cx: &Ctx) -> Result<Value> {
    let api = &cx.api;
    let conc = cx.args.concurrency;
    let n = cx.args.fanout_members.max(1);
    let users = api.register_many("fan", n, conc).await?;
    let room = api.create_room(&users[0], "public_chat").await?;
    api.join_all(&users[1..], &room, conc).await?;
    let prepared: Vec<(Poller, String)> = stream::iter(users.iter())
        .map(|u| {
            let room = room.clone();
            async move {
                let f = api.room_filter(u, &room).await;
                let (since, f) = api.initial_since(u, Some(f)).await?;
                Ok::<_, anyhow::Error>((Poller::new(api, u, f), since))
            }
        })
        .buffered(conc)
        .try_collect()
        .await?;
    let (pollers, mut sinces): (Vec<Poller>, Vec<String>) = prepared.into_iter().unzip();

    let mut last = Vec::new();
    let mut median_member = Vec::new();
    for round in 0..cx.args.fanout_rounds {
        let nonce: Arc<str> = cx.nonce("fan", round).into();
        let deadline = Instant::now() + Duration::from_secs(40);
        let handles: Vec<_> = pollers
            .iter()
            .zip(sinces.iter())
            .map(|(p, s)| {
                let p = p.clone();
                let s = s.clone();
                let nonce = nonce.clone();
                tokio::spawn(async move {
                    p.until_nonce(s, nonce.as_bytes(), 30_000, deadline, None)
                        .await
                })
            })
            .collect();
        let _guard = AbortGuard::of(&handles);
        // Let every long-poll reach the server before the send.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        api.send_text(&users[0], &room, &nonce).await?;
        let mut per = Vec::with_capacity(n);
        for (i, h) in handles.into_iter().enumerate() {
            let (arrived, nb) = h
                .await
                .context("sync task panicked")?
                .with_context(|| format!("round {round}, member {i}"))?;
            sinces[i] = nb;
            per.push(ms(arrived.saturating_duration_since(t0)));
        }
        let s = Stats::new(per);
        last.push(s.max);
        median_member.push(s.p50);
    }
    let st = Stats::new(last);
    let ok = st.p50 <= 20.0 && st.p99 <= 20.0;
    human(
        "fanout",
        &format!(
            "last of {n}: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} rounds)",
            st.p50, st.p99, st.max, st.n
        ),
        "≤20 ms",
        ok,
    );
    Ok(json!({
        "members": n,
        "rounds": st.n,
        "last_delivery": st.json(),
        "median_member_delivery": Stats::new(median_member).json(),
        "meets_target": ok,
    }))
}

/// Scenario 4: Hold many long-polls on distinct devices; server RSS growth per poll.
async fn longpoll_memory(cx: &Ctx) -> Result<Value> {
    let Some(pid) = cx.args.server_pid else {
        println!("{:<18} skipped (needs --server-pid)", "longpoll_memory");
        return Ok(json!({ "skipped": "needs --server-pid" }));
    };
    let api = &cx.api;
    let conc = cx.args.concurrency;
    let n = cx.args.longpolls.max(1);
    let one_device = !cx.args.longpoll_distinct_devices;
    let nusers = if one_device {
        1
    } else {
        cx.args.longpoll_users.clamp(1, n)
    };
    let per_user = n.div_ceil(nusers);
    let users = api.register_many("lp", nusers, conc).await?;
    let room = api.create_room(&users[0], "public_chat").await?;
    api.join_all(&users[1..], &room, conc).await?;

    // Devices: each user's registration device plus logins up to `per_user` (or, with
    // the default one-device mode, the first user's device for every poll).
    let mut jobs = Vec::new();
    if !one_device {
        for u in &users {
            for _ in 1..per_user {
                jobs.push(u.localpart.clone());
            }
        }
    }
    let mut devices: Vec<Session> = users.clone();
    let logged_in: Vec<Session> = stream::iter(jobs.iter())
        .map(|lp| api.login(lp))
        .buffer_unordered(conc)
        .try_collect()
        .await?;
    devices.extend(logged_in);
    if one_device {
        devices = vec![users[0].clone(); n];
    }
    devices.truncate(n);

    let filters: Vec<String> = stream::iter(users.iter())
        .map(|u| api.room_filter(u, &room))
        .buffered(conc)
        .collect()
        .await;
    let by_user: BTreeMap<&str, &String> = users
        .iter()
        .map(|u| u.user_id.as_str())
        .zip(filters.iter())
        .collect();
    let prepared: Vec<(Poller, String)> = stream::iter(devices.iter())
        .map(|d| {
            let f = by_user.get(d.user_id.as_str()).map(|f| (*f).clone());
            async move {
                let (since, f) = api.initial_since(d, f).await?;
                Ok::<_, anyhow::Error>((Poller::new(api, d, f), since))
            }
        })
        .buffer_unordered(conc)
        .try_collect()
        .await?;

    // Set-up (1,000 logins hash passwords) leaves memory the allocator returns to the OS only
    // gradually; take the baseline once the server's RSS has settled (at most 15 s).
    let mut rss_before = rss_kib(pid)?;
    let settle_deadline = Instant::now() + Duration::from_secs(15);
    loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = rss_kib(pid)?;
        let settled = now.abs_diff(rss_before) * 100 <= rss_before.max(1);
        rss_before = now;
        if settled || Instant::now() > settle_deadline {
            break;
        }
    }
    let fds_before = open_fds(pid);

    let in_flight = Arc::new(AtomicUsize::new(0));
    let nonce: Arc<str> = cx.nonce("lp", 0).into();
    let deadline = Instant::now() + Duration::from_secs(90);
    let handles: Vec<_> = prepared
        .into_iter()
        .map(|(p, since)| {
            let nonce = nonce.clone();
            let inf = in_flight.clone();
            tokio::spawn(async move {
                p.until_nonce(since, nonce.as_bytes(), 60_000, deadline, Some(&inf))
                    .await
            })
        })
        .collect();
    let _guard = AbortGuard::of(&handles);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Give stragglers up to 8 s more to be in flight.
    for _ in 0..80 {
        if in_flight.load(Ordering::SeqCst) >= handles.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = in_flight.load(Ordering::SeqCst);
    let finished_early = handles.iter().filter(|h| h.is_finished()).count();
    let rss_held = rss_kib(pid)?;
    let fds_held = open_fds(pid);

    // Release: one event in the shared room wakes every device.
    let t0 = Instant::now();
    api.send_text(&users[0], &room, &nonce).await?;
    let mut woken = 0usize;
    let mut wake_errors = Vec::new();
    let mut last_wake = Duration::ZERO;
    let collect_deadline = Instant::now() + Duration::from_secs(30);
    for h in handles {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(collect_deadline, h).await {
            Ok(Ok(Ok((arrived, _)))) => {
                woken += 1;
                last_wake = last_wake.max(arrived.saturating_duration_since(t0));
            }
            Ok(Ok(Err(e))) => {
                if wake_errors.len() < 5 {
                    wake_errors.push(format!("{e:#}"));
                }
            }
            Ok(Err(e)) => wake_errors.push(format!("task: {e}")),
            Err(_) => {
                abort.abort();
                if wake_errors.len() < 5 {
                    wake_errors.push("not woken within 30 s".to_owned());
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_kib(pid).ok();

    let divisor = held.max(1) as f64;
    let kib_per_poll = (rss_held as f64 - rss_before as f64) / divisor;
    let idle_mib = cx.idle_rss_kib.map(|k| k as f64 / 1024.0);
    // RSS that falls while polls are held means the allocator was still returning set-up memory
    // (1,000 password hashes): the figure says nothing then, so it cannot pass.
    let conclusive = kib_per_poll >= 0.0;
    if !conclusive {
        println!(
            "{:<18} inconclusive: RSS fell while polls were held; rerun on a fresh server without \
             --longpoll-distinct-devices",
            "longpoll_memory"
        );
    }
    let ok = conclusive && held == n && kib_per_poll <= 8.0 && idle_mib.is_some_and(|m| m <= 40.0);
    human(
        "longpoll_memory",
        &format!(
            "{kib_per_poll:.2} KiB/poll ({held} held of {n}; RSS {:.1} → {:.1} MiB)  idle RSS {} MiB  all woken in {:.1} ms ({woken}/{n})",
            rss_before as f64 / 1024.0,
            rss_held as f64 / 1024.0,
            idle_mib.map_or("?".to_owned(), |m| format!("{m:.1}")),
            ms(last_wake)
        ),
        "≤8 KiB/poll, ≤40 MB idle",
        ok,
    );
    Ok(json!({
        "longpolls": n,
        "users": nusers,
        "held_in_flight": held,
        "finished_before_wake": finished_early,
        "rss_before_kib": rss_before,
        "rss_held_kib": rss_held,
        "rss_after_release_kib": rss_after,
        "kib_per_longpoll": round3(kib_per_poll),
        "conclusive": conclusive,
        "idle_rss_mib": idle_mib.map(round3),
        "server_fds_before": fds_before,
        "server_fds_held": fds_held,
        "server_fd_soft_limit": fd_soft_limit_of(pid),
        "woken": woken,
        "wake_all_ms": round3(ms(last_wake)),
        "wake_errors": wake_errors,
        "meets_target": ok,
    }))
}

/// Scenario 5: Full initial `/sync` of a user in many rooms with history.
async fn initial_sync(cx: &Ctx) -> Result<Value> {
    let api = &cx.api;
    let conc = cx.args.concurrency;
    let u = api.register_many("ini", 1, 1).await?.remove(0);
    // Created one at a time: concurrent createRoom calls by one user can
    // produce identical create events (and so the same room ID).
    let mut rooms = Vec::with_capacity(cx.args.initial_rooms);
    for _ in 0..cx.args.initial_rooms {
        rooms.push(api.create_room(&u, "private_chat").await?);
    }
    let msgs = cx.args.initial_messages;
    stream::iter(rooms.iter())
        .map(|room| {
            let u = &u;
            async move {
                for i in 0..msgs {
                    api.send_text(u, room, &format!("initial sync history message {i}"))
                        .await?;
                }
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(conc * 2)
        .try_collect::<Vec<()>>()
        .await?;

    let mut times = Vec::new();
    let mut bytes = 0usize;
    let mut joined = 0usize;
    let mut timeline_events = 0usize;
    for i in 0..5 {
        let t0 = Instant::now();
        let (body, arrived) = api.sync(&u.token, None, 0, None).await?;
        times.push(ms(arrived.saturating_duration_since(t0)));
        if i == 0 {
            bytes = body.len();
            let v: Value = serde_json::from_slice(&body).context("parsing /sync")?;
            if let Some(join) = v["rooms"]["join"].as_object() {
                joined = join.len();
                timeline_events = join
                    .values()
                    .map(|r| r["timeline"]["events"].as_array().map_or(0, Vec::len))
                    .sum();
            }
        }
    }
    let st = Stats::new(times);
    let ok = st.p50 <= 30.0;
    human(
        "initial_sync",
        &format!(
            "median {:.2} ms  (min {:.2}, max {:.2})  {bytes} bytes, {joined} rooms, {timeline_events} timeline events",
            st.p50, st.min, st.max
        ),
        "≤30 ms",
        ok,
    );
    if joined != rooms.len() {
        eprintln!(
            "  note: initial sync listed {joined} joined rooms, expected {}",
            rooms.len()
        );
    }
    Ok(json!({
        "rooms": rooms.len(),
        "messages_per_room": msgs,
        "median_ms": round3(st.p50),
        "time": st.json(),
        "response_bytes": bytes,
        "joined_rooms_in_response": joined,
        "timeline_events_in_response": timeline_events,
        "meets_target": ok,
    }))
}

/// Runs `n` jobs `conc` at a time; returns (successes, errors, error
/// samples, per-job latencies, elapsed).
async fn rate_loop<F, Fut>(
    n: usize,
    conc: usize,
    job: F,
) -> (usize, usize, Vec<String>, Vec<f64>, f64)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let start = Instant::now();
    let results: Vec<(Result<()>, f64)> = stream::iter(0..n)
        .map(|i| {
            let fut = job(i);
            async move {
                let t = Instant::now();
                let r = fut.await;
                (r, ms(t.elapsed()))
            }
        })
        .buffer_unordered(conc.max(1))
        .collect()
        .await;
    let elapsed = start.elapsed().as_secs_f64();
    let mut ok = 0;
    let mut samples = Vec::new();
    let mut lat = Vec::with_capacity(n);
    for (r, l) in results {
        match r {
            Ok(()) => {
                ok += 1;
                lat.push(l);
            }
            Err(e) => {
                if samples.len() < 5 {
                    samples.push(format!("{e:#}"));
                }
            }
        }
    }
    (ok, n - ok, samples, lat, elapsed)
}

/// Scenario 6: Room creation rate and public-room join rate.
async fn room_rates(cx: &Ctx) -> Result<Value> {
    let api = &cx.api;
    let conc = cx.args.concurrency.max(1);
    let creators = api.register_many("rrc", conc, conc).await?;
    let joiners = api.register_many("rrj", cx.args.joiners, conc).await?;

    let (c_ok, c_err, c_samples, c_lat, c_el) = rate_loop(cx.args.create_rooms, conc, |i| {
        let s = &creators[i % creators.len()];
        async move { api.create_room(s, "private_chat").await.map(|_| ()) }
    })
    .await;
    let create_rate = c_ok as f64 / c_el;

    let public: Vec<String> = stream::iter(0..cx.args.join_rooms)
        .map(|i| api.create_room(&creators[i % creators.len()], "public_chat"))
        .buffer_unordered(conc)
        .try_collect()
        .await?;
    let nrooms = public.len().max(1);
    let (j_ok, j_err, j_samples, j_lat, j_el) =
        rate_loop(public.len() * joiners.len(), conc, |k| {
            let room = &public[k % nrooms];
            let s = &joiners[k / nrooms];
            async move { api.join(s, room).await }
        })
        .await;
    let join_rate = j_ok as f64 / j_el;
    let (cst, jst) = (Stats::new(c_lat), Stats::new(j_lat));
    let ok = create_rate >= 200.0 && join_rate >= 500.0 && c_err == 0 && j_err == 0;
    human(
        "room_rates",
        &format!(
            "create {create_rate:.0} rooms/s ({c_ok} ok, {c_err} err, p50 {:.2} ms)  join {join_rate:.0} joins/s ({j_ok} ok, {j_err} err, p50 {:.2} ms)  concurrency {conc}",
            cst.p50, jst.p50
        ),
        "≥200 rooms/s, ≥500 joins/s",
        ok,
    );
    Ok(json!({
        "concurrency": conc,
        "create": {
            "rooms_per_sec": (create_rate * 10.0).round() / 10.0,
            "ok": c_ok, "errors": c_err, "error_samples": c_samples,
            "elapsed_s": round3(c_el), "latency": cst.json(),
        },
        "join": {
            "joins_per_sec": (join_rate * 10.0).round() / 10.0,
            "ok": j_ok, "errors": j_err, "error_samples": j_samples,
            "elapsed_s": round3(j_el), "latency": jst.json(),
            "rooms": public.len(), "joiners": joiners.len(),
        },
        "meets_target": ok,
    }))
}

// ---------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------

/// Refuses anything but loopback targets.
fn check_loopback(url: &str) -> Result<()> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("invalid --url {url}"))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        bail!("--url must be http(s), got {url}");
    }
    let host = parsed.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("--url must point at a loopback address (127.0.0.0/8, ::1, localhost), got {url}");
    }
    Ok(())
}

async fn check_server(api: &Api) -> Result<()> {
    let url = format!("{}/_matrix/client/versions", api.base);
    let resp = api
        .http
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| {
            anyhow!(
                "no Matrix server is answering at {} ({e}).\n\
                 Start one first, e.g.:\n  \
                 MYELIN_REGISTRATION=open MYELIN_DATA_DIR=$(mktemp -d) cargo run --release -p myelin",
                api.base
            )
        })?;
    let status = resp.status();
    if !status.is_success() {
        bail!("GET {url} -> {status}: is this a Matrix server?");
    }
    Ok(())
}

async fn run_scenario(name: &str, cx: &Ctx) -> Result<Value> {
    match name {
        "send_sync_latency" => send_sync_latency(cx).await,
        "send_throughput" => send_throughput(cx).await,
        "fanout" => fanout(cx).await,
        "longpoll_memory" => longpoll_memory(cx).await,
        "initial_sync" => initial_sync(cx).await,
        "room_rates" => room_rates(cx).await,
        other => bail!("unknown scenario {other}"),
    }
}

async fn run(args: Args) -> Result<bool> {
    check_loopback(&args.url)?;
    for name in &args.only {
        if !SCENARIOS.contains(&name.as_str()) {
            bail!("unknown scenario {name:?}; known: {}", SCENARIOS.join(", "));
        }
    }
    if let Some(pid) = args.server_pid {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("--server-pid {pid}: no such process");
        }
    }
    let nofile = raise_nofile(args.longpolls as u64 + 1024);
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let run_id = format!(
        "{:x}{:x}",
        (started.as_millis() as u64) & 0xff_ffff_ffff,
        std::process::id() & 0xffff
    );
    let api = Api::new(&args.url, &run_id)?;
    check_server(&api).await?;

    let idle_rss_kib = args.server_pid.and_then(|pid| rss_kib(pid).ok());
    eprintln!(
        "myelin-bench: target {}  run {run_id}  nofile {nofile}{}",
        args.url,
        idle_rss_kib.map_or(String::new(), |k| format!(
            "  server RSS {:.1} MiB",
            k as f64 / 1024.0
        ))
    );
    let selected: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s))
        .collect();
    let cx = Ctx {
        api,
        args,
        idle_rss_kib,
    };

    let mut results = serde_json::Map::new();
    let mut all_ok = true;
    for name in selected {
        eprintln!("-- {name}: setting up and running…");
        let t = Instant::now();
        let v = match run_scenario(name, &cx).await {
            Ok(mut v) => {
                v["scenario_wall_s"] = json!(round3(t.elapsed().as_secs_f64()));
                if let Some(pid) = cx.args.server_pid {
                    v["server_rss_after_kib"] = json!(rss_kib(pid).ok());
                }
                v
            }
            Err(e) => {
                all_ok = false;
                println!("{name:<18} ERROR: {e:#}");
                json!({ "error": format!("{e:#}") })
            }
        };
        results.insert(name.to_owned(), v);
    }

    let pid = cx.args.server_pid;
    let out = json!({
        "bench": "myelin-bench",
        "url": cx.args.url,
        "run_id": cx.api.run_id.as_ref(),
        "started_unix_s": started.as_secs(),
        "server_pid": pid,
        "server_rss_start_kib": idle_rss_kib,
        "server_rss_end_kib": pid.and_then(|p| rss_kib(p).ok()),
        "server_peak_rss_kib": pid.and_then(|p| proc_status_kib(p, "VmHWM:")),
        "all_scenarios_ran": all_ok,
        "scenarios": results,
    });
    println!("{}", serde_json::to_string(&out)?);
    if let Some(path) = &cx.args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&out)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(all_ok)
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("myelin-bench: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("myelin-bench: {e:#}");
            std::process::exit(2);
        }
    }
}
