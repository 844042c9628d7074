//! Checks a run's history against the contract in `docs/contract.md`.
//!
//! One pass over the records, in the order they happened:
//! - **lost**: every event appended to an origin topic was handled
//!   successfully at least once or dead-lettered; every acknowledged publish
//!   is in the log.
//! - **order**: version n+1 of an aggregate never starts before version n
//!   completed (handled, or dead-lettered) anywhere. This is race-free: the
//!   history is totally ordered, and replays after a rebalance are fine
//!   because they start from a committed point.
//! - **concurrent**: one consumer incarnation never runs two events of one
//!   aggregate at the same time (the pool's per-key rule).
//! - **skipped-commit**: when the broker accepts a commit of offset c, every
//!   event below c in that partition has completed.
//! - **duplicate**: without faults, no event is handled successfully twice.
//!   With faults, a re-handled event lies at or after the committed offset
//!   its consumer's assignment started from, and one assignment never
//!   handles an event twice (beyond copies of it in the log).
//! - **dead-letter**: only events whose handler fails for good are
//!   dead-lettered, after `max_attempts`, with headers naming their origin.
//! - **close**: after `bus.close()`, no task of the bus or session is alive.
//! - **alerts**: the bus's backlog alerts of one source start and recover in
//!   turn, and its connection alerts drop and return in turn.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::history::{Event, EventId, HandlerEnd, Record, Tp};
use crate::scenario::{Behaviour, Planned};

/// A broken rule, with the record that broke it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: &'static str,
    pub message: String,
    /// Sequence number of the offending record, if one.
    pub at: Option<u64>,
    /// Text that marks related records (an aggregate, a partition), for the trace tail.
    pub focus: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.rule, self.message)
    }
}

/// What the checker needs to know about the run.
pub struct CheckContext<'a> {
    pub origin_topics: BTreeSet<String>,
    pub behaviour: &'a Behaviour,
    /// Whether the run had faults (network, crashes, closes).
    pub faulty: bool,
}

fn tp_focus(tp: &Tp) -> String {
    format!("(\"{}\", {})", tp.0, tp.1)
}

fn agg_focus(id: &EventId) -> String {
    format!("agg: \"{}\"", id.agg)
}

/// A running handler: its version, and the assignment (record seq) it started under.
type Running = (i64, Option<u64>);

#[derive(Default)]
struct State {
    /// Origin-topic logs: the event at each offset.
    logs: BTreeMap<Tp, Vec<Option<EventId>>>,
    /// Where each event is in the log (several places after a producer retry).
    copies: BTreeMap<EventId, Vec<(Tp, u64)>>,
    /// Handled successfully or dead-lettered.
    completed: BTreeSet<EventId>,
    ok_count: BTreeMap<EventId, u32>,
    /// Versions running per (incarnation, aggregate), with the assignment
    /// (record seq) they were started under.
    open: BTreeMap<(String, String), Vec<Running>>,
    /// Latest assignment of a partition to a client: (start offset, record seq).
    assignment: BTreeMap<(String, Tp), (u64, u64)>,
    /// Successes of an event within one assignment: (assignment seq, count).
    per_assignment: BTreeMap<(String, EventId), (u64, u32)>,
    /// Every offset below this was complete at an accepted commit.
    verified: BTreeMap<Tp, u64>,
    /// Backlogs started and not recovered, per (incarnation, source).
    backlogged: BTreeSet<(String, String)>,
    /// Incarnations whose bus said the connection dropped and not yet back.
    disconnected: BTreeSet<String>,
}

pub fn check(records: &[Record], ctx: &CheckContext<'_>) -> Vec<Violation> {
    let mut st = State::default();
    let mut out: Vec<Violation> = Vec::new();
    let mut v = |rule: &'static str, message: String, at: Option<u64>, focus: Vec<String>| {
        // Enough to diagnose; a broken run can produce thousands.
        if out.iter().filter(|x| x.rule == rule).count() < 5 {
            out.push(Violation { rule, message, at, focus });
        }
    };
    for r in records {
        let at = Some(r.seq);
        match &r.event {
            Event::Append { tp, offset, id, dlq: None } if ctx.origin_topics.contains(&tp.0) => {
                let log = st.logs.entry(tp.clone()).or_default();
                if log.len() as u64 != *offset {
                    v(
                        "lost",
                        format!("log {tp:?} skipped to offset {offset} from {}", log.len()),
                        at,
                        vec![tp_focus(tp)],
                    );
                }
                log.resize(*offset as usize, None);
                log.push(id.clone());
                if let Some(id) = id {
                    st.copies.entry(id.clone()).or_default().push((tp.clone(), *offset));
                }
            }
            Event::Append { tp, id, dlq: Some(info), .. } => {
                let Some(id) = id else {
                    v("dead-letter", format!("undecodable message dead-lettered in {tp:?}"), at, vec![]);
                    continue;
                };
                let focus = vec![agg_focus(id)];
                match ctx.behaviour.planned(id) {
                    Planned::Permanent => {}
                    other => v(
                        "dead-letter",
                        format!("{id} was dead-lettered but its handler was planned to {other:?}"),
                        at,
                        focus.clone(),
                    ),
                }
                if info.attempts != ctx.behaviour.max_attempts || info.reason != "handler" {
                    v(
                        "dead-letter",
                        format!(
                            "{id} dead-lettered after {} attempts (reason {:?}), expected {} handler attempts",
                            info.attempts, info.reason, ctx.behaviour.max_attempts
                        ),
                        at,
                        focus.clone(),
                    );
                }
                let origin = (info.origin_topic.clone(), info.origin_partition);
                let at_origin =
                    st.logs.get(&origin).and_then(|l| l.get(info.origin_offset as usize)).cloned().flatten();
                if at_origin.as_ref() != Some(id) {
                    v(
                        "dead-letter",
                        format!(
                            "{id} dead-lettered with origin {origin:?}@{} which holds {at_origin:?}",
                            info.origin_offset
                        ),
                        at,
                        focus,
                    );
                }
                st.completed.insert(id.clone());
            }
            Event::Published { id, tp, offset, .. } => {
                let stored = st.logs.get(tp).and_then(|l| l.get(*offset as usize)).cloned().flatten();
                if stored.as_ref() != Some(id) {
                    v(
                        "lost",
                        format!("publish of {id} acknowledged at {tp:?}@{offset}, which holds {stored:?}"),
                        at,
                        vec![agg_focus(id)],
                    );
                }
            }
            Event::Assign { client, tp, start, .. } => {
                st.assignment.insert((client.clone(), tp.clone()), (*start, r.seq));
            }
            Event::Begin { inc, id, .. } => {
                let focus = vec![agg_focus(id)];
                if let Some(prev) = id.prev() {
                    if !st.completed.contains(&prev) {
                        v("order", format!("{id} started on {inc} before {prev} completed"), at, focus.clone());
                    }
                }
                let tp = st.copies.get(id).and_then(|c| c.first()).map(|c| c.0.clone());
                let assigned_at = tp.and_then(|tp| st.assignment.get(&(inc.clone(), tp))).map(|a| a.1);
                let running = st.open.entry((inc.clone(), id.agg.clone())).or_default();
                if let Some((other, _)) = running.first() {
                    v(
                        "concurrent",
                        format!("{id} started on {inc} while v{other} of {} was running there", id.agg),
                        at,
                        focus.clone(),
                    );
                }
                running.push((id.version, assigned_at));
                if ctx.faulty && st.completed.contains(id) {
                    // A replay: it must come from a committed point at or before it.
                    let places = st.copies.get(id).cloned().unwrap_or_default();
                    match places.first() {
                        None => v("lost", format!("{id} handled on {inc} but never appended"), at, focus.clone()),
                        Some((tp, _)) => {
                            let last = places.iter().map(|p| p.1).max().unwrap_or(0);
                            match st.assignment.get(&(inc.clone(), tp.clone())) {
                                None => v("duplicate", format!("{id} re-handled on {inc}, which was never assigned {tp:?}"), at, focus.clone()),
                                Some((start, _)) if last < *start => v(
                                    "duplicate",
                                    format!("{id} (offset {last} of {tp:?}) re-handled on {inc}, whose assignment starts at committed offset {start}"),
                                    at,
                                    focus.clone(),
                                ),
                                Some(_) => {}
                            }
                        }
                    }
                }
            }
            Event::End { inc, id, end } => {
                let mut started_under = None;
                if let Some(running) = st.open.get_mut(&(inc.clone(), id.agg.clone())) {
                    if let Some(i) = running.iter().position(|x| x.0 == id.version) {
                        started_under = running.remove(i).1;
                    }
                }
                if *end != HandlerEnd::Ok {
                    continue;
                }
                st.completed.insert(id.clone());
                let copies = st.copies.get(id).map_or(1, |c| c.len()) as u32;
                let n = st.ok_count.entry(id.clone()).or_default();
                *n += 1;
                if !ctx.faulty && *n > copies {
                    v(
                        "duplicate",
                        format!("{id} handled successfully {n} times in a run without faults"),
                        at,
                        vec![agg_focus(id)],
                    );
                }
                if ctx.faulty {
                    // Counted against the assignment the run started under: a
                    // handler still running when its partition was lost may
                    // finish after the same consumer got the partition back.
                    if let Some(tp) = st.copies.get(id).and_then(|c| c.first()).map(|c| c.0.clone()) {
                        if let Some(assigned_at) = started_under {
                            let e = st.per_assignment.entry((inc.clone(), id.clone())).or_insert((assigned_at, 0));
                            if e.0 != assigned_at {
                                *e = (assigned_at, 0);
                            }
                            e.1 += 1;
                            if e.1 > copies {
                                v(
                                    "duplicate",
                                    format!(
                                        "{id} handled successfully {} times by {inc} within one assignment of {tp:?}",
                                        e.1
                                    ),
                                    at,
                                    vec![agg_focus(id)],
                                );
                            }
                        }
                    }
                }
            }
            Event::Commit { client, tp, offset, accepted: true, .. } if ctx.origin_topics.contains(&tp.0) => {
                let log = st.logs.get(tp).map_or(&[][..], |l| &l[..]);
                if *offset as usize > log.len() {
                    v(
                        "skipped-commit",
                        format!("{client} committed {tp:?}@{offset} beyond the log end {}", log.len()),
                        at,
                        vec![tp_focus(tp)],
                    );
                    continue;
                }
                let from = st.verified.get(tp).copied().unwrap_or(0);
                let mut ok = true;
                for o in from..*offset {
                    let entry = &log[o as usize];
                    if !entry.as_ref().is_some_and(|id| st.completed.contains(id)) {
                        let what = entry.as_ref().map_or("an undecodable message".to_string(), |id| id.to_string());
                        let mut focus = vec![tp_focus(tp)];
                        focus.extend(entry.as_ref().map(agg_focus));
                        v(
                            "skipped-commit",
                            format!("{client} committed {tp:?}@{offset} while offset {o} ({what}) had not completed"),
                            at,
                            focus,
                        );
                        ok = false;
                        break;
                    }
                }
                if ok && *offset > from {
                    st.verified.insert(tp.clone(), *offset);
                }
            }
            Event::Closed { inc, alive_tasks, final_commit_error, .. } => {
                if *alive_tasks > 0 {
                    v(
                        "close",
                        format!("{alive_tasks} tasks still alive on {inc} after bus.close() returned"),
                        at,
                        vec![inc.clone()],
                    );
                }
                // A failed final commit is the network's doing; a failed consumer task is ours.
                if let Some(e) = final_commit_error.as_ref().filter(|e| e.contains("consumer task failed")) {
                    v("close", format!("bus.close() on {inc}: {e}"), at, vec![inc.clone()]);
                }
            }
            Event::Backlog { inc, source, started, value } => {
                let key = (inc.clone(), source.clone());
                let ok = if *started { st.backlogged.insert(key) } else { st.backlogged.remove(&key) };
                if !ok {
                    let what = if *started { "started while already backlogged" } else { "recovered without a start" };
                    v("alerts", format!("{inc}: {source} backlog {what} (value {value})"), at, vec![inc.clone()]);
                }
            }
            Event::Connection { inc, up } => {
                let ok = if *up { st.disconnected.remove(inc) } else { st.disconnected.insert(inc.clone()) };
                if !ok {
                    let what = if *up { "reconnected without a disconnection" } else { "disconnected twice" };
                    v("alerts", format!("{inc}: connection {what}"), at, vec![inc.clone()]);
                }
            }
            Event::Panic { message } => {
                v("panic", format!("panic: {message}"), at, vec![]);
            }
            Event::Started { inc } => {
                // A new incarnation runs nothing yet.
                st.open.retain(|(i, _), _| i != inc);
            }
            _ => {}
        }
    }
    let mut lost = Vec::new();
    for (tp, log) in &st.logs {
        for (o, id) in log.iter().enumerate() {
            match id {
                Some(id) if st.completed.contains(id) => {}
                _ => lost.push((tp.clone(), o, id.clone())),
            }
        }
    }
    if !lost.is_empty() {
        let (tp, o, id) = &lost[0];
        let what = id.as_ref().map_or("an undecodable message".to_string(), |id| id.to_string());
        let mut focus = vec![tp_focus(tp)];
        focus.extend(id.as_ref().map(agg_focus));
        v(
            "lost",
            format!("{} events never handled nor dead-lettered; first: {what} at {tp:?}@{o}", lost.len()),
            None,
            focus,
        );
    }
    out
}
