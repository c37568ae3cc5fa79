//! Presence (spec § "Presence"; federation § "Presence"): which devices of a user are
//! connected, and the state that follows from it.
//!
//! A transport that keeps a device connected (a `/sync` long-poll in flight, an open WebSocket
//! sync stream) holds a [`SyncingGuard`] for as long as it runs; dropping the guard starts the
//! device's grace period (`presence.grace_ms`, 30 s), during which the device still counts as
//! syncing, so a client that polls again (or reconnects) within it changes nothing anyone sees.
//! Actions a user takes (sends, typing, receipts, setting their presence) mark them active.
//!
//! A user's state, from their devices:
//! - no device syncing (none with a live guard other than `set_presence=offline`, none in its
//!   grace period), or an explicit `PUT … offline`: `offline`;
//! - some device syncing `online` and activity within `presence.idle_ms` (5 min): `online`
//!   and `currently_active`; a device that starts syncing counts as activity (a re-poll within
//!   the grace period does not);
//! - otherwise (all syncing devices `unavailable`, idle, or an explicit `PUT … unavailable`
//!   not followed by activity): `unavailable`.
//!
//! Only a change of the published triple (state, `currently_active`, `status_msg`) is
//! published: it takes a position on the presence stream, is written to the `presence` table,
//! wakes the local users sharing a room with the user and is sent as an `m.presence` EDU to
//! the servers sharing one — O(watchers) per change. Heartbeats cost a lock and a few map
//! operations. `last_active_ago` is computed from the in-memory last-active time whenever
//! presence is shown; while a user stays active that time is written at most once a minute
//! ([`TOUCH_MS`]), with no stream position, so a restart shows it roughly right.
//!
//! One task re-evaluates users at their deadlines (end of a grace period, idle timeout), kept
//! in a `BTreeSet` ordered by time: nothing scans all users. Another writes the published
//! changes in batches (one transaction for many users).
//!
//! After a restart every stored row is loaded; a local user who was not offline is treated as
//! if their devices had just stopped syncing (offline after the grace period unless one
//! reconnects). Other servers' users keep the state their server last sent.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use serde_json::{json, Map, Value};
use tokio::{sync::mpsc, time::Instant};

use crate::{
    config::PresenceConfig,
    store::{now_ms, PresenceRow},
    Error, Result, Server,
};

/// While a user stays active, their stored last-active time lags at most this much.
pub const TOUCH_MS: i64 = 60_000;
/// Most changes written in one transaction.
const MAX_BATCH: usize = 512;

/// A presence state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Online,
    Unavailable,
    Offline,
}

impl State {
    pub fn parse(s: &str) -> Option<State> {
        match s {
            "online" => Some(State::Online),
            "unavailable" => Some(State::Unavailable),
            "offline" => Some(State::Offline),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Online => "online",
            State::Unavailable => "unavailable",
            State::Offline => "offline",
        }
    }

    /// A `set_presence` value (`None` and unknown values = `online`).
    fn of_set_presence(s: Option<&str>) -> State {
        s.and_then(State::parse).unwrap_or(State::Online)
    }
}

/// `M_INVALID_PARAM` unless `set_presence` is absent or one of the three states.
pub fn check_set_presence(set_presence: Option<&str>) -> Result<()> {
    match set_presence {
        Some(s) if State::parse(s).is_none() => Err(Error::invalid_param(format!(
            "set_presence must be online, unavailable or offline, not {s:?}"
        ))),
        _ => Ok(()),
    }
}

/// A user's presence as shown to clients.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceView {
    pub state: State,
    pub status_msg: Option<String>,
    /// Unix milliseconds; 0 when unknown.
    pub last_active_ts: i64,
    pub currently_active: bool,
}

impl PresenceView {
    /// The content of an `m.presence` event (also the `GET /presence` body).
    pub fn content(&self) -> Value {
        let mut c = Map::new();
        c.insert("presence".into(), json!(self.state.as_str()));
        if self.last_active_ts > 0 {
            c.insert(
                "last_active_ago".into(),
                json!((now_ms() - self.last_active_ts).max(0)),
            );
        }
        c.insert("currently_active".into(), json!(self.currently_active));
        if let Some(m) = &self.status_msg {
            c.insert("status_msg".into(), json!(m));
        }
        Value::Object(c)
    }
}

/// Presence of every user we know of.
pub struct Presence {
    enabled: bool,
    grace: Duration,
    idle_ms: i64,
    inner: Mutex<Inner>,
    /// Wakes the deadline task when an earlier deadline is added.
    timer: tokio::sync::Notify,
    jobs: mpsc::UnboundedSender<Job>,
    jobs_rx: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
}

#[derive(Default)]
struct Inner {
    users: HashMap<String, User>,
    /// `(when, user)`: each user's next re-evaluation.
    deadlines: BTreeSet<(Instant, String)>,
    next_guard: u64,
}

#[derive(Default)]
struct User {
    devices: HashMap<String, Device>,
    /// A state set through `PUT /presence`, counted like a device in its grace period.
    api: Option<(Instant, State)>,
    /// `unavailable` or `offline` set through `PUT /presence`, until the next activity.
    explicit: Option<State>,
    /// Unix ms of the latest activity (0: none known).
    last_active: i64,
    /// `last_active` as last written.
    stored_active: i64,
    status_msg: Option<String>,
    /// What others were last told (`None`: never published).
    published: Option<Published>,
    deadline: Option<Instant>,
    /// A user of another server: their server tells us their state.
    remote: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Published {
    state: State,
    currently_active: bool,
    status_msg: Option<String>,
    stream_id: i64,
}

#[derive(Default)]
struct Device {
    /// Guard ID → its `set_presence`.
    live: HashMap<u64, State>,
    /// After its last guard dropped: until when, and as what, it still counts.
    lingering: Option<(Instant, State)>,
}

impl Device {
    /// How the device counts now: `None` when it is not syncing.
    fn effective(&self, now: Instant) -> Option<State> {
        let live = self.live.values().copied().filter(|s| *s != State::Offline);
        let lingering = self.lingering.filter(|(t, _)| *t > now).map(|(_, s)| s);
        live.chain(lingering)
            .min_by_key(|s| if *s == State::Online { 0 } else { 1 })
    }
}

enum Job {
    /// The user's published presence changed: write it and tell those concerned.
    Publish(String),
    /// Store a newer last-active time.
    Touch(String),
    /// Answered once every job queued before it is written and published.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Held while a device is syncing; see the module docs.
pub struct SyncingGuard {
    presence: Arc<Presence>,
    user_id: String,
    device_id: String,
    /// 0: presence is disabled, the guard does nothing.
    id: u64,
}

impl Default for Presence {
    fn default() -> Self {
        Presence::new(&PresenceConfig::default())
    }
}

impl Presence {
    pub fn new(config: &PresenceConfig) -> Presence {
        let (jobs, rx) = mpsc::unbounded_channel();
        Presence {
            enabled: config.enabled,
            grace: Duration::from_millis(config.grace_ms),
            idle_ms: config.idle_ms as i64,
            inner: Mutex::new(Inner::default()),
            timer: tokio::sync::Notify::new(),
            jobs,
            jobs_rx: Mutex::new(Some(rx)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `device_id` of `user_id` is syncing with `set_presence` (`online`, `unavailable`,
    /// `offline`; `None` = `online`) until the guard is dropped.
    pub fn syncing(
        self: &Arc<Self>,
        user_id: &str,
        device_id: &str,
        set_presence: Option<&str>,
    ) -> SyncingGuard {
        let mut guard = SyncingGuard {
            presence: self.clone(),
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            id: 0,
        };
        if !self.enabled {
            return guard;
        }
        let state = State::of_set_presence(set_presence);
        let now = Instant::now();
        let mut g = self.lock();
        g.next_guard += 1;
        guard.id = g.next_guard;
        let u = g.users.entry(user_id.to_owned()).or_default();
        let d = u.devices.entry(device_id.to_owned()).or_default();
        let before = d.effective(now);
        d.live.insert(guard.id, state);
        d.lingering = None;
        if state == State::Online && before != Some(State::Online) {
            // Coming online (not a re-poll within the grace period) is activity.
            u.last_active = now_ms();
        }
        self.update(&mut g, user_id, now);
        guard
    }

    /// `user_id` did something (sent, typed, sent a receipt): bumps `last_active_ts`, and
    /// ends an explicit `unavailable` or `offline`.
    pub fn active(&self, user_id: &str) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let mut g = self.lock();
        // Someone we hold nothing of is offline, and activity alone does not change that.
        let Some(u) = g.users.get_mut(user_id) else {
            return;
        };
        u.last_active = now_ms();
        u.explicit = None;
        self.update(&mut g, user_id, now);
    }

    /// `PUT /presence/{userId}/status`: the state (counted like a device that just synced with
    /// it; `offline` hides the user until they set another state or act) and the status
    /// message (`None` clears it).
    ///
    /// The answer resolves once what it changed is written and visible to syncs.
    pub fn set_status(
        &self,
        user_id: &str,
        state: State,
        status_msg: Option<String>,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (done, written) = tokio::sync::oneshot::channel();
        if !self.enabled {
            return written;
        }
        let now = Instant::now();
        let mut g = self.lock();
        let u = g.users.entry(user_id.to_owned()).or_default();
        u.status_msg = status_msg;
        u.last_active = now_ms();
        match state {
            State::Online => {
                u.explicit = None;
                u.api = Some((now + self.grace, State::Online));
            }
            State::Unavailable => {
                u.explicit = Some(State::Unavailable);
                u.api = Some((now + self.grace, State::Unavailable));
            }
            State::Offline => {
                u.explicit = Some(State::Offline);
                u.api = None;
            }
        }
        self.update(&mut g, user_id, now);
        // Behind the change in the writer's queue.
        let _ = self.jobs.send(Job::Flush(done));
        written
    }

    /// A user of another server, as their server reports it.
    pub fn set_remote(
        &self,
        user_id: &str,
        state: State,
        last_active_ago: i64,
        currently_active: bool,
        status_msg: Option<String>,
    ) {
        let mut g = self.lock();
        let u = g.users.entry(user_id.to_owned()).or_default();
        u.remote = true;
        u.last_active = now_ms() - last_active_ago.clamp(0, 10 * 365 * 86_400_000);
        let next = (
            state,
            currently_active && state == State::Online,
            status_msg,
        );
        self.publish_if_changed(u, user_id, next);
    }

    /// What `user_id`'s presence looks like now, if we know it.
    pub fn view(&self, user_id: &str) -> Option<PresenceView> {
        let g = self.lock();
        g.users.get(user_id).and_then(view_of)
    }

    /// Of `users`, those whose presence was published at a position in `(since, now]`
    /// (`since` `None`: every one with a published state), with how it looks now.
    pub fn changed_among<'a>(
        &self,
        users: impl IntoIterator<Item = &'a String>,
        since: Option<i64>,
        now: i64,
    ) -> Vec<(String, PresenceView)> {
        let g = self.lock();
        users
            .into_iter()
            .filter_map(|id| {
                let u = g.users.get(id)?;
                let p = u.published.as_ref()?;
                let moved = match since {
                    Some(s) => p.stream_id > s && p.stream_id <= now,
                    None => p.stream_id <= now,
                };
                moved.then(|| view_of(u).map(|v| (id.clone(), v)))?
            })
            .collect()
    }

    /// Re-evaluates a local user, reschedules their deadline and publishes a change.
    fn update(&self, g: &mut Inner, user_id: &str, now: Instant) {
        let Some(u) = g.users.get_mut(user_id) else {
            return;
        };
        if u.remote {
            return;
        }
        let (state, currently_active, deadline) = self.evaluate(u, now);
        let next = (state, currently_active, u.status_msg.clone());
        self.publish_if_changed(u, user_id, next);
        let old = u.deadline;
        u.deadline = deadline;
        if old != deadline {
            if let Some(t) = old {
                g.deadlines.remove(&(t, user_id.to_owned()));
            }
            if let Some(t) = deadline {
                let earliest = g.deadlines.first().is_none_or(|(first, _)| t < *first);
                g.deadlines.insert((t, user_id.to_owned()));
                if earliest {
                    self.timer.notify_one();
                }
            }
        }
        // Forget users with nothing going on and nothing published.
        if let Some(u) = g.users.get(user_id) {
            if u.published.is_none() && u.devices.is_empty() && u.api.is_none() {
                g.users.remove(user_id);
            }
        }
    }

    /// Queues a publication when the published triple changes; otherwise may queue a touch of
    /// the stored last-active time.
    fn publish_if_changed(
        &self,
        u: &mut User,
        user_id: &str,
        (state, currently_active, status_msg): (State, bool, Option<String>),
    ) {
        let changed = match &u.published {
            Some(p) => {
                p.state != state
                    || p.currently_active != currently_active
                    || p.status_msg != status_msg
            }
            // Never seen and offline: nothing to tell.
            None => state != State::Offline || status_msg.is_some(),
        };
        if changed {
            let stream_id = u.published.as_ref().map(|p| p.stream_id).unwrap_or(0);
            u.published = Some(Published {
                state,
                currently_active,
                status_msg,
                stream_id,
            });
            u.stored_active = u.last_active;
            let _ = self.jobs.send(Job::Publish(user_id.to_owned()));
        } else if u.published.is_some() && u.last_active - u.stored_active >= TOUCH_MS {
            u.stored_active = u.last_active;
            let _ = self.jobs.send(Job::Touch(user_id.to_owned()));
        }
    }

    /// `(state, currently_active, next deadline)` of a local user now; drops what expired.
    fn evaluate(&self, u: &mut User, now: Instant) -> (State, bool, Option<Instant>) {
        let mut next: Option<Instant> = None;
        let mut soonest = |t: Instant| {
            if next.is_none_or(|n| t < n) {
                next = Some(t);
            }
        };
        u.devices.retain(|_, d| {
            if d.lingering.is_some_and(|(t, _)| t <= now) {
                d.lingering = None;
            }
            !d.live.is_empty() || d.lingering.is_some()
        });
        if u.api.is_some_and(|(t, _)| t <= now) {
            u.api = None;
        }
        let mut sources: Vec<State> = u
            .devices
            .values()
            .filter_map(|d| d.effective(now))
            .collect();
        for d in u.devices.values() {
            if let Some((t, _)) = d.lingering {
                soonest(t);
            }
        }
        if let Some((t, s)) = u.api {
            soonest(t);
            if s != State::Offline {
                sources.push(s);
            }
        }
        if sources.is_empty() || u.explicit == Some(State::Offline) {
            return (State::Offline, false, next);
        }
        if u.explicit == Some(State::Unavailable) {
            return (State::Unavailable, false, next);
        }
        let idle_in = u.last_active + self.idle_ms - now_ms();
        if idle_in > 0 && sources.contains(&State::Online) {
            soonest(now + Duration::from_millis(idle_in as u64));
            return (State::Online, true, next);
        }
        (State::Unavailable, false, next)
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.lock().deadlines.first().map(|(t, _)| *t)
    }

    /// Re-evaluates the users whose deadline has come.
    fn tick(&self, now: Instant) {
        let mut g = self.lock();
        let mut due = Vec::new();
        while let Some((t, _)) = g.deadlines.first() {
            if *t > now {
                break;
            }
            if let Some((_, user)) = g.deadlines.pop_first() {
                due.push(user);
            }
        }
        for user in due {
            if let Some(u) = g.users.get_mut(&user) {
                u.deadline = None;
            }
            self.update(&mut g, &user, now);
        }
    }

    /// Takes the rows of users about to be written, giving each its stream position.
    fn rows_for(&self, users: &[(String, Option<i64>)]) -> Vec<(PresenceRow, bool)> {
        let mut g = self.lock();
        let mut out = Vec::new();
        for (user, pos) in users {
            let Some(u) = g.users.get_mut(user) else {
                continue;
            };
            let Some(p) = u.published.as_mut() else {
                continue;
            };
            if let Some(pos) = pos {
                p.stream_id = *pos;
            }
            out.push((
                PresenceRow {
                    user_id: user.clone(),
                    state: p.state.as_str().to_owned(),
                    status_msg: p.status_msg.clone(),
                    last_active_ts: u.last_active,
                    currently_active: p.currently_active,
                    stream_id: p.stream_id,
                },
                !u.remote,
            ));
        }
        out
    }

    /// Loads the stored rows (start-up).
    fn load(&self, rows: Vec<PresenceRow>, is_local: impl Fn(&str) -> bool) {
        let now = Instant::now();
        let mut g = self.lock();
        for row in rows {
            let Some(state) = State::parse(&row.state) else {
                continue;
            };
            let remote = !is_local(&row.user_id);
            let u = g.users.entry(row.user_id.clone()).or_default();
            u.remote = remote;
            u.last_active = row.last_active_ts;
            u.stored_active = row.last_active_ts;
            u.status_msg = row.status_msg.clone();
            u.published = Some(Published {
                state,
                currently_active: row.currently_active,
                status_msg: row.status_msg,
                stream_id: row.stream_id,
            });
            if !remote && state != State::Offline {
                // As if its devices had just stopped syncing.
                u.api = Some((now + self.grace, state));
                if state == State::Unavailable {
                    u.explicit = Some(State::Unavailable);
                }
                self.update(&mut g, &row.user_id, now);
            }
        }
    }
}

fn view_of(u: &User) -> Option<PresenceView> {
    let p = u.published.as_ref()?;
    Some(PresenceView {
        state: p.state,
        status_msg: p.status_msg.clone(),
        last_active_ts: u.last_active,
        currently_active: p.currently_active,
    })
}

impl SyncingGuard {
    /// The device reports a new `set_presence` (a WebSocket `ping` or `sync` frame).
    pub fn set_presence(&self, set_presence: Option<&str>) {
        if self.id == 0 {
            return;
        }
        let state = State::of_set_presence(set_presence);
        let p = &self.presence;
        let now = Instant::now();
        let mut g = p.lock();
        let Some(u) = g.users.get_mut(&self.user_id) else {
            return;
        };
        let Some(d) = u.devices.get_mut(&self.device_id) else {
            return;
        };
        let before = d.effective(now);
        d.live.insert(self.id, state);
        if state == State::Online && before != Some(State::Online) {
            u.last_active = now_ms();
        }
        p.update(&mut g, &self.user_id, now);
    }
}

impl Drop for SyncingGuard {
    fn drop(&mut self) {
        if self.id == 0 {
            return;
        }
        let p = &self.presence;
        let now = Instant::now();
        let mut g = p.lock();
        let Some(u) = g.users.get_mut(&self.user_id) else {
            return;
        };
        let Some(d) = u.devices.get_mut(&self.device_id) else {
            return;
        };
        if let Some(state) = d.live.remove(&self.id) {
            if state != State::Offline {
                // The better of this guard's state and what still lingers.
                let lingering_online = d
                    .lingering
                    .is_some_and(|(t, s)| t > now && s == State::Online);
                let keep = if lingering_online {
                    State::Online
                } else {
                    state
                };
                d.lingering = Some((now + p.grace, keep));
            }
        }
        p.update(&mut g, &self.user_id, now);
    }
}

/// Loads the stored presence and starts the deadline and writer tasks.
pub async fn start(server: &Arc<Server>) -> Result<()> {
    let presence = &server.presence;
    let rows = server.store.all_presence().await?;
    let suffix = format!(":{}", server.server_name());
    presence.load(rows, |u| u.ends_with(&suffix));
    let rx = presence
        .jobs_rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(rx) = rx {
        tokio::spawn(writer_task(Arc::downgrade(server), rx));
    }
    tokio::spawn(deadline_task(Arc::downgrade(server)));
    Ok(())
}

async fn deadline_task(weak: Weak<Server>) {
    loop {
        let Some(server) = weak.upgrade() else {
            return;
        };
        let presence = server.presence.clone();
        drop(server);
        let next = presence.next_deadline();
        let notified = presence.timer.notified();
        match next {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t) => presence.tick(Instant::now()),
                    _ = notified => {}
                }
            }
            None => {
                if tokio::time::timeout(Duration::from_secs(60), notified)
                    .await
                    .is_err()
                    && weak.strong_count() == 0
                {
                    return;
                }
            }
        }
    }
}

async fn writer_task(weak: Weak<Server>, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let Some(server) = weak.upgrade() else {
            return;
        };
        server.write_presence(jobs).await;
    }
}

impl Server {
    /// Writes a batch of presence changes in one transaction, with their EDUs; then publishes
    /// the positions and wakes the local users sharing a room with each.
    async fn write_presence(&self, jobs: Vec<Job>) {
        let mut publish: Vec<String> = Vec::new();
        let mut touch: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for j in &jobs {
            if let Job::Publish(u) = j {
                if seen.insert(u.clone()) {
                    publish.push(u.clone());
                }
            }
        }
        let mut flushes = Vec::new();
        for j in jobs {
            match j {
                Job::Touch(u) if seen.insert(u.clone()) => touch.push(u),
                Job::Flush(done) => flushes.push(done),
                _ => {}
            }
        }
        let publish_set: HashSet<&String> = publish.iter().collect();
        let positions = self.presence_stream.allocate(publish.len());
        let mut wanted: Vec<(String, Option<i64>)> = publish
            .iter()
            .cloned()
            .zip(positions.iter().copied().map(Some))
            .collect();
        wanted.extend(touch.iter().cloned().map(|u| (u, None)));
        let rows = self.presence.rows_for(&wanted);
        let mut wake: HashSet<String> = HashSet::new();
        let mut edus: HashMap<String, Vec<Value>> = HashMap::new();
        for (row, local) in rows
            .iter()
            .filter(|(r, _)| publish_set.contains(&r.user_id))
        {
            match self.presence_audience(&row.user_id, *local).await {
                Ok((users, servers)) => {
                    wake.extend(users);
                    let mut item = PresenceView {
                        state: State::parse(&row.state).unwrap_or(State::Offline),
                        status_msg: row.status_msg.clone(),
                        last_active_ts: row.last_active_ts,
                        currently_active: row.currently_active,
                    }
                    .content();
                    item["user_id"] = json!(row.user_id);
                    if item.get("last_active_ago").is_none() {
                        item["last_active_ago"] = json!(0);
                    }
                    for s in servers {
                        edus.entry(s).or_default().push(item.clone());
                    }
                }
                Err(e) => tracing::warn!(error = %e, user = %row.user_id, "presence audience"),
            }
        }
        let edus: Vec<(String, String)> = edus
            .into_iter()
            .flat_map(|(dest, items)| {
                items
                    .chunks(100)
                    .map(|c| {
                        let edu = json!({"edu_type": "m.presence", "content": {"push": c}});
                        (dest.clone(), edu.to_string())
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let written = async {
            let mut w = self.store.write().await?;
            for (row, _) in &rows {
                if publish_set.contains(&row.user_id) {
                    w.put_presence(row).await?;
                } else {
                    w.touch_presence(&row.user_id, row.last_active_ts).await?;
                }
            }
            w.queue_edus(&edus).await?;
            w.commit().await
        }
        .await;
        self.presence_stream.complete(&positions);
        if let Err(e) = written {
            tracing::warn!(error = %e, "writing presence");
        }
        self.notifier.wake(wake.iter().map(String::as_str));
        self.outbox_signal
            .wake(edus.into_iter().map(|(d, _)| d).collect());
        for done in flushes {
            let _ = done.send(());
        }
    }

    /// The local users to tell about `user_id`'s presence (themself included) and, for a local
    /// user, the other servers sharing a room with them.
    async fn presence_audience(
        &self,
        user_id: &str,
        local: bool,
    ) -> Result<(HashSet<String>, HashSet<String>)> {
        let mut users = HashSet::new();
        let mut servers = HashSet::new();
        let rooms: Vec<i64> = if local {
            users.insert(user_id.to_owned());
            self.user_memberships(user_id)
                .await?
                .iter()
                .filter(|m| m.membership == "join")
                .map(|m| m.room_nid)
                .collect()
        } else {
            self.store.rooms_with_member(user_id).await?
        };
        for nid in rooms {
            for (u, m) in self.members(nid).await?.iter() {
                if m == "join" && self.is_local_user(u) {
                    users.insert(u.clone());
                }
            }
            if local && self.presence.enabled() {
                servers.extend(self.room_servers(nid).await?.iter().cloned());
            }
        }
        Ok((users, servers))
    }

    /// The users whose presence `user_id` sees: themself and everyone joined to a room they
    /// are joined to.
    async fn presence_sharers(&self, user_id: &str) -> Result<HashSet<String>> {
        let mut users = HashSet::new();
        users.insert(user_id.to_owned());
        for m in self.user_memberships(user_id).await?.iter() {
            if m.membership != "join" {
                continue;
            }
            for (u, ms) in self.members(m.room_nid).await?.iter() {
                if ms == "join" {
                    users.insert(u.clone());
                }
            }
        }
        Ok(users)
    }

    /// The `m.presence` events of a sync between presence positions `since` (`None`:
    /// initial) and `now`, filtered by the sync filter's `presence`.
    pub async fn presence_for_sync(
        &self,
        user_id: &str,
        since: Option<i64>,
        now: i64,
        filter: &crate::filter::EventFilter,
    ) -> Result<Vec<Value>> {
        if !self.presence.enabled() || since.is_some_and(|s| s >= now) {
            return Ok(Vec::new());
        }
        if !crate::typing::type_allowed(filter, "m.presence") {
            return Ok(Vec::new());
        }
        let sharers = self.presence_sharers(user_id).await?;
        let mut changed = self.presence.changed_among(&sharers, since, now);
        changed.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(changed
            .into_iter()
            .filter(|(u, _)| filter.allows_type_sender("m.presence", u))
            .map(|(u, v)| json!({"type": "m.presence", "sender": u, "content": v.content()}))
            .collect())
    }

    /// `GET /presence/{userId}/status` by `viewer`: their own, or a user sharing a room with
    /// them (`M_FORBIDDEN` otherwise). Unknown presence reads as `offline`.
    pub async fn get_presence(&self, viewer: &str, user_id: &str) -> Result<Value> {
        if !self.presence.enabled() {
            return Ok(json!({"presence": "offline"}));
        }
        if viewer != user_id && !self.presence_sharers(viewer).await?.contains(user_id) {
            return Err(Error::forbidden(
                "You are not allowed to see their presence",
            ));
        }
        Ok(self
            .presence
            .view(user_id)
            .map(|v| v.content())
            .unwrap_or_else(|| json!({"presence": "offline"})))
    }

    /// An `m.presence` EDU from `origin`: each update about a user of `origin` who shares a
    /// room with one of ours is kept and shown to them.
    pub async fn receive_presence(&self, origin: &str, content: &Value) -> Result<()> {
        if !self.presence.enabled() {
            return Ok(());
        }
        let Some(push) = content.get("push").and_then(Value::as_array) else {
            return Err(Error::bad_json("m.presence lacks push"));
        };
        for item in push.iter().take(1000) {
            let (Some(user), Some(state)) = (
                item.get("user_id")
                    .and_then(Value::as_str)
                    .and_then(|u| ruma::UserId::parse(u).ok()),
                item.get("presence")
                    .and_then(Value::as_str)
                    .and_then(State::parse),
            ) else {
                continue;
            };
            if user.server_name().as_str() != origin {
                continue;
            }
            if self
                .store
                .rooms_with_member(user.as_str())
                .await?
                .is_empty()
            {
                continue;
            }
            let ago = item
                .get("last_active_ago")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let active = item
                .get("currently_active")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let msg = item
                .get("status_msg")
                .and_then(Value::as_str)
                .map(|m| m.chars().take(1024).collect());
            self.presence
                .set_remote(user.as_str(), state, ago, active, msg);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(grace_ms: u64, idle_ms: u64) -> Arc<Presence> {
        Arc::new(Presence::new(&PresenceConfig {
            enabled: true,
            grace_ms,
            idle_ms,
        }))
    }

    fn state(p: &Presence, u: &str) -> Option<State> {
        p.view(u).map(|v| v.state)
    }

    #[tokio::test]
    async fn a_short_drop_changes_nothing() {
        let p = presence(60_000, 600_000);
        let g = p.syncing("@a:x", "D", None);
        assert_eq!(state(&p, "@a:x"), Some(State::Online));
        drop(g);
        assert_eq!(
            state(&p, "@a:x"),
            Some(State::Online),
            "in the grace period"
        );
        let _g = p.syncing("@a:x", "D", None);
        assert_eq!(state(&p, "@a:x"), Some(State::Online));
        // One publication (coming online), none for the drop and the new guard.
        let mut rx = p.jobs_rx.lock().unwrap().take().unwrap();
        assert!(matches!(rx.try_recv(), Ok(Job::Publish(_))));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn devices_aggregate_and_offline_does_not_count() {
        let p = presence(60_000, 600_000);
        let idle = p.syncing("@a:x", "PHONE", Some("unavailable"));
        assert_eq!(state(&p, "@a:x"), Some(State::Unavailable));
        let on = p.syncing("@a:x", "LAPTOP", Some("online"));
        assert_eq!(state(&p, "@a:x"), Some(State::Online));
        on.set_presence(Some("unavailable"));
        assert_eq!(state(&p, "@a:x"), Some(State::Unavailable));
        drop((idle, on));
        let _hidden = p.syncing("@b:x", "D", Some("offline"));
        assert_eq!(state(&p, "@b:x"), None, "never shown");
    }

    #[tokio::test]
    async fn grace_and_idle_expire_by_deadline() {
        let p = presence(50, 100_000);
        drop(p.syncing("@a:x", "D", None));
        let t = p.next_deadline().unwrap();
        p.tick(t + Duration::from_millis(1));
        assert_eq!(state(&p, "@a:x"), Some(State::Offline));
        assert!(p.next_deadline().is_none());
    }

    #[test]
    fn set_presence_values() {
        assert!(check_set_presence(Some("busy")).is_err());
        assert!(check_set_presence(Some("unavailable")).is_ok());
        assert!(check_set_presence(None).is_ok());
    }
}
