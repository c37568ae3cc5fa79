//! `state-res-bench`: the cost of resolving a fork with many conflicted state events, with
//! the resolution Myelin runs ([`myelin_core::resolution::resolve`], ruma's state resolution
//! v2.1 for room v12).
//!
//! The room: a create event, its creator's join, power levels, public join rules and
//! `--members` joined members. Then two forks from that point, each by the same authors: a
//! power-levels change (different on each side) and `(--conflicted - 2) / 2` state events
//! `m.bench.note` with state keys shared by both sides and contents that differ, so the two
//! states conflict in exactly `--conflicted` events (two of them power events, which take
//! the costlier ordering). Events are built, hashed and signed as the server builds its own;
//! building them is not timed. Timed: the resolution (auth chains given, as the server loads
//! them from the store), and, apart, computing the two auth chains in memory.
//! Peak memory: the most heap allocated during one resolution beyond what was allocated
//! before it (a counting allocator around the system one), and the process's peak RSS.
//!
//! ```text
//! cargo run --release -p myelin-core --bin state-res-bench -- [--conflicted 1000] [--members 1000] [--runs 5]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use myelin_core::keys::SigningKey;
use myelin_core::pdu::{build_pdu, rules_for, EventFrame, NewEvent, Pdu};
use myelin_core::resolution::resolve;
use myelin_core::ruma::{
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    state_res::{utils::event_id_set::EventIdSet, StateMap},
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId,
    UInt,
};
use serde_json::{json, Value};

/// The system allocator, counting bytes in use and their high-water mark.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

struct Args {
    conflicted: usize,
    members: usize,
    runs: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        conflicted: 1000,
        members: 1000,
        runs: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> Result<usize, String> {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value"))?
                .parse()
                .map_err(|e| format!("{flag}: {e}"))
        };
        match flag.as_str() {
            "--conflicted" => args.conflicted = value()?,
            "--members" => args.members = value()?,
            "--runs" => args.runs = value()?.max(1),
            "-h" | "--help" => {
                return Err(
                    "usage: state-res-bench [--conflicted N] [--members N] [--runs N]".into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.conflicted < 4 || !args.conflicted.is_multiple_of(2) {
        return Err("--conflicted must be even and at least 4".into());
    }
    if args.members < 2 {
        return Err("--members must be at least 2".into());
    }
    Ok(args)
}

/// Builds a room's events one after another, tracking its state so that every event gets
/// the auth events the server would choose.
struct Room {
    rules: RoomVersionRules,
    version: RoomVersionId,
    key: SigningKey,
    room_id: OwnedRoomId,
    state: StateMap<OwnedEventId>,
    prev: Vec<OwnedEventId>,
    depth: i64,
    ts: u64,
}

impl Room {
    fn add(
        &mut self,
        pdus: &mut HashMap<OwnedEventId, Arc<Pdu>>,
        sender: &OwnedUserId,
        kind: &str,
        state_key: &str,
        content: Value,
    ) -> Result<OwnedEventId, String> {
        let raw = serde_json::value::to_raw_value(&content).map_err(|e| e.to_string())?;
        let event = NewEvent::state(kind, state_key, content).map_err(|e| e.to_string())?;
        let types = myelin_core::ruma::state_res::auth_types_for_event(
            &TimelineEventType::from(kind),
            sender,
            Some(state_key),
            &raw,
            &self.rules.authorization,
        )?;
        let mut auth: Vec<OwnedEventId> = types
            .iter()
            .filter_map(|t| self.state.get(t).cloned())
            .collect();
        auth.sort();
        auth.dedup();
        self.depth += 1;
        self.ts += 1;
        let frame = EventFrame {
            room_id: &self.room_id,
            version: &self.version,
            rules: &self.rules,
            sender,
            prev_events: &self.prev,
            auth_events: &auth,
            depth: self.depth,
            origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::new(self.ts).unwrap_or_default()),
        };
        let pdu = build_pdu(event, &frame, "bench.test", &self.key).map_err(|e| e.to_string())?;
        if kind == "m.room.create" {
            self.room_id = pdu.room_id.clone();
        }
        let id = pdu.event_id.clone();
        self.state.insert(
            (StateEventType::from(kind), state_key.to_owned()),
            id.clone(),
        );
        self.prev = vec![id.clone()];
        pdus.insert(id.clone(), Arc::new(pdu));
        Ok(id)
    }
}

fn user(name: &str) -> Result<OwnedUserId, String> {
    OwnedUserId::try_from(format!("@{name}:bench.test")).map_err(|e| e.to_string())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("state-res-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let version = RoomVersionId::V12;
    let rules = rules_for(&version).map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("state-res-bench-{}", std::process::id()));
    let key = SigningKey::load_or_generate(&dir.join("signing.key")).map_err(|e| e.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    let mut room = Room {
        rules: rules.clone(),
        version: version.clone(),
        key: key?,
        room_id: RoomId::parse("!placeholder:bench.test").map_err(|e| e.to_string())?,
        state: StateMap::new(),
        prev: Vec::new(),
        depth: 0,
        ts: 1_700_000_000_000,
    };
    let build_started = Instant::now();
    let mut pdus = HashMap::new();
    let creator = user("creator")?;
    room.add(
        &mut pdus,
        &creator,
        "m.room.create",
        "",
        json!({"room_version": "12"}),
    )?;
    let join = || json!({"membership": "join"});
    room.add(
        &mut pdus,
        &creator,
        "m.room.member",
        creator.as_str(),
        join(),
    )?;
    let power = |moderator: &str| {
        json!({
            "users": {moderator: 50},
            "users_default": 0,
            "events_default": 0,
            "state_default": 0,
            "events": {"m.room.power_levels": 100},
        })
    };
    room.add(
        &mut pdus,
        &creator,
        "m.room.power_levels",
        "",
        power("@member1:bench.test"),
    )?;
    room.add(
        &mut pdus,
        &creator,
        "m.room.join_rules",
        "",
        json!({"join_rule": "public"}),
    )?;
    let members: Vec<OwnedUserId> = (1..args.members)
        .map(|i| user(&format!("member{i}")))
        .collect::<Result<_, _>>()?;
    for m in &members {
        room.add(&mut pdus, m, "m.room.member", m.as_str(), join())?;
    }

    // The fork: the same authors, different contents.
    let notes = (args.conflicted - 2) / 2;
    let base_state = room.state.clone();
    let base_prev = room.prev.clone();
    let base_depth = room.depth;
    let mut sides = Vec::new();
    for (side, moderator) in [("a", "@member2:bench.test"), ("b", "@member3:bench.test")] {
        room.state = base_state.clone();
        room.prev = base_prev.clone();
        room.depth = base_depth;
        room.add(
            &mut pdus,
            &creator,
            "m.room.power_levels",
            "",
            power(moderator),
        )?;
        for i in 0..notes {
            let author = &members[i % members.len()];
            room.add(
                &mut pdus,
                author,
                "m.bench.note",
                &format!("note{i}"),
                json!({"side": side, "i": i}),
            )?;
        }
        sides.push(room.state.clone());
    }
    let conflicted = sides[0]
        .iter()
        .filter(|(k, v)| sides[1].get(*k) != Some(*v))
        .count()
        * 2;
    let build_s = build_started.elapsed().as_secs_f64();
    eprintln!(
        "built {} events ({} state entries per side, {conflicted} conflicted) in {build_s:.2} s",
        pdus.len(),
        sides[0].len()
    );
    if conflicted != args.conflicted {
        return Err(format!(
            "the fork conflicts in {conflicted} events, not {}",
            args.conflicted
        ));
    }

    let mut chain_ms = Vec::new();
    let mut resolve_ms = Vec::new();
    let mut peak_bytes = Vec::new();
    let mut resolved_len = 0;
    for _ in 0..args.runs {
        let t = Instant::now();
        let chains: Vec<_> = sides
            .iter()
            .map(|s| auth_chain(s.values().cloned(), &pdus))
            .collect();
        chain_ms.push(t.elapsed().as_secs_f64() * 1000.0);

        let before = IN_USE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let t = Instant::now();
        let resolved = resolve(&rules, &sides, chains, &pdus).map_err(|e| e.to_string())?;
        resolve_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        peak_bytes.push(PEAK.load(Ordering::Relaxed).saturating_sub(before));
        check(&resolved, &sides, notes, args.members)?;
        resolved_len = resolved.len();
    }
    let median = |xs: &mut Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let peak = *peak_bytes.iter().max().unwrap_or(&0);
    let rss_kib = peak_rss_kib();
    let summary = json!({
        "room_version": "12",
        "members": args.members,
        "conflicted_events": conflicted,
        "state_entries_per_side": sides[0].len(),
        "resolved_entries": resolved_len,
        "events_in_memory": pdus.len(),
        "runs": args.runs,
        "resolve_ms": {"median": round(median(&mut resolve_ms.clone())), "min": round(resolve_ms.iter().cloned().fold(f64::MAX, f64::min))},
        "auth_chains_ms": {"median": round(median(&mut chain_ms))},
        "peak_heap_during_resolve_bytes": peak,
        "process_peak_rss_kib": rss_kib,
    });
    eprintln!(
        "resolved {conflicted} conflicted events ({} members): median {:.1} ms over {} runs; \
         peak heap during resolution {:.1} MiB; process peak RSS {:.1} MiB",
        args.members,
        median(&mut resolve_ms),
        args.runs,
        peak as f64 / (1024.0 * 1024.0),
        rss_kib.unwrap_or(0) as f64 / 1024.0
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// The resolved state holds every member, one of the two power levels and, for every note,
/// one of its two versions.
fn check(
    resolved: &StateMap<OwnedEventId>,
    sides: &[StateMap<OwnedEventId>],
    notes: usize,
    members: usize,
) -> Result<(), String> {
    let count = |ty: &str| resolved.keys().filter(|(t, _)| t.to_string() == ty).count();
    if count("m.room.member") != members {
        return Err(format!(
            "resolved state has {} members, not {members}",
            count("m.room.member")
        ));
    }
    if count("m.bench.note") != notes {
        return Err(format!(
            "resolved state has {} notes, not {notes}",
            count("m.bench.note")
        ));
    }
    for (k, v) in resolved {
        if sides.iter().all(|s| s.get(k) != Some(v)) {
            return Err(format!("resolved {k:?} to an event of neither side"));
        }
    }
    Ok(())
}

/// The auth chain of `ids` (every event reachable through `auth_events`, `ids` included)
/// among `pdus`.
fn auth_chain(
    ids: impl IntoIterator<Item = OwnedEventId>,
    pdus: &HashMap<OwnedEventId, Arc<Pdu>>,
) -> EventIdSet<OwnedEventId> {
    let mut set = EventIdSet::new();
    let mut queue: Vec<OwnedEventId> = ids.into_iter().collect();
    while let Some(id) = queue.pop() {
        if let Some(p) = pdus.get(&id) {
            if set.insert(id) {
                queue.extend(p.auth_events.iter().cloned());
            }
        }
    }
    set
}

/// The process's peak resident set (`VmHWM`), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
