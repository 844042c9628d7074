//! `SimBroker` / `SimSession`: `eventbus::broker::{Broker, Session}` over the
//! simulated network, so the production consumer runs on it unchanged.
//!
//! Publishing holds one connection (no background task), reconnecting and
//! retrying with the same producer sequence when `idempotent`. A session is
//! a driver task that owns its own connection: it joins the group, polls
//! (every poll is a heartbeat), fetches from client-side positions, and
//! hands the consumer what it got through a channel, so `next` is
//! cancel-safe. When the connection drops it reconnects; when the session
//! expired meanwhile (or the broker restarted) it yields
//! `SessionEvent::Lost` for its partitions, waits until the consumer took
//! that, and rejoins. It also gives its partitions up as lost by itself when
//! it has not been heard by the broker for most of the session timeout, so
//! it stops working on them before the broker hands them to someone else —
//! unless the nemesis turned that off ([`ClientConfig::self_release`]): then
//! a client cut off from the broker keeps working on partitions the broker
//! gave away, and its late commits must be fenced by the broker.
//!
//! Like the real adapters it reports its connection state (`Connected`
//! after a request was answered, `Disconnected` after one failed) and the
//! group's lag (read from the broker), so the bus's connection and backlog
//! alerts run under the simulator.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use eventbus::broker::{
    Broker, BrokerError, ConnectionState, Delivery, Outbound, PartitionLag, Position, Session, SessionEvent,
    TopicPartition,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use turmoil::net::TcpStream;

use crate::history::{Event, History};
use crate::proto::{
    read_frame, write_frame, ConnError, ErrorKind, Request, RequestFrame, Response, ResponseFrame, WireEvent, WireTp,
};

/// Client settings of the adapter.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the broker.
    pub broker: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Pause before reconnecting / retrying.
    pub backoff: Duration,
    /// A publish gives up after this long (the caller may publish again).
    pub publish_timeout: Duration,
    /// The broker's session timeout; the client gives its partitions up as
    /// lost after 90% of it without an answer.
    pub session_timeout: Duration,
    pub poll_interval: Duration,
    /// Messages fetched per poll.
    pub fetch_max: u32,
    /// Fetch only while fewer than this many messages wait for the consumer.
    pub buffer: usize,
    /// Give the partitions up as lost after 90% of the session timeout
    /// without an answer. Off (a nemesis switch), a cut-off client works on
    /// until the broker tells it the member is gone.
    pub self_release: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            broker: format!("{}:{}", crate::broker::BROKER, crate::broker::PORT),
            connect_timeout: Duration::from_millis(100),
            request_timeout: Duration::from_millis(250),
            backoff: Duration::from_millis(50),
            publish_timeout: Duration::from_secs(2),
            session_timeout: Duration::from_millis(600),
            poll_interval: Duration::from_millis(20),
            fetch_max: 16,
            buffer: 16,
            self_release: true,
        }
    }
}

/// One request/response connection.
struct Conn {
    stream: TcpStream,
    next_id: u64,
}

impl Conn {
    async fn open(cfg: &ClientConfig) -> Result<Conn, ConnError> {
        match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(cfg.broker.as_str())).await {
            Ok(Ok(stream)) => Ok(Conn { stream, next_id: 1 }),
            Ok(Err(e)) => Err(ConnError::Io(e.to_string())),
            Err(_) => Err(ConnError::Timeout),
        }
    }

    async fn call(&mut self, body: Request, timeout: Duration) -> Result<Response, ConnError> {
        let id = self.next_id;
        self.next_id += 1;
        let exchange = async {
            write_frame(&mut self.stream, &RequestFrame { id, body }).await?;
            let resp: ResponseFrame = read_frame(&mut self.stream).await?;
            if resp.id != id {
                return Err(ConnError::Mismatch { want: id, got: resp.id });
            }
            Ok(resp.body)
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| ConnError::Timeout)?
    }
}

/// The client's view of its broker: `Connected` after an answer,
/// `Disconnected` after a failed connect or exchange.
type Link = Arc<watch::Sender<ConnectionState>>;

fn set_link(link: &Link, state: ConnectionState) {
    link.send_if_modified(|s| std::mem::replace(s, state) != state);
}

/// Calls over an optional connection, opening it if needed and dropping it
/// on any failure (a timed-out exchange leaves the stream mid-frame).
async fn call(conn: &mut Option<Conn>, cfg: &ClientConfig, link: &Link, body: Request) -> Result<Response, ConnError> {
    if conn.is_none() {
        match Conn::open(cfg).await {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                set_link(link, ConnectionState::Disconnected);
                return Err(e);
            }
        }
    }
    let result = conn.as_mut().expect("opened above").call(body, cfg.request_timeout).await;
    match result {
        Ok(_) => set_link(link, ConnectionState::Connected),
        Err(_) => {
            *conn = None;
            set_link(link, ConnectionState::Disconnected);
        }
    }
    result
}

fn wire(tp: &TopicPartition) -> WireTp {
    WireTp { topic: tp.topic.to_string(), partition: tp.partition }
}

fn unwire(tp: &WireTp) -> TopicPartition {
    TopicPartition::new(tp.topic.as_str(), tp.partition)
}

fn hist_tp(tp: &TopicPartition) -> (String, u32) {
    (tp.topic.to_string(), tp.partition)
}

fn broker_error(kind: ErrorKind, message: String) -> BrokerError {
    match kind {
        ErrorKind::UnknownTopic => BrokerError::UnknownTopic(message),
        ErrorKind::CommitRejected => BrokerError::CommitRejected { partition: String::new(), reason: message },
        ErrorKind::Config => BrokerError::Config { key: "broker".into(), reason: message },
        ErrorKind::Other => BrokerError::Other(message),
    }
}

struct Inner {
    cfg: ClientConfig,
    /// Label of this client in the history (the consumer incarnation).
    client: String,
    history: History,
    /// Taken out while a publish uses it, so a cancelled publish drops it.
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// Producer id for idempotent publishing, and its next sequence.
    producer: Option<(u64, AtomicU64)>,
    /// For `consumer_lag` (one attempt, so a sample never waits on publishes).
    lag_conn: tokio::sync::Mutex<Option<Conn>>,
    link: Link,
}

/// A connection to the simulated broker. Create it inside the host that uses it.
#[derive(Clone)]
pub struct SimBroker {
    inner: Arc<Inner>,
}

impl SimBroker {
    /// `producer`: an id unique in the simulation makes publishes idempotent
    /// (retries keep their sequence; one publish at a time).
    pub fn new(cfg: ClientConfig, client: impl Into<String>, history: History, producer: Option<u64>) -> Self {
        SimBroker {
            inner: Arc::new(Inner {
                cfg,
                client: client.into(),
                history,
                conn: tokio::sync::Mutex::new(None),
                producer: producer.map(|id| (id, AtomicU64::new(1))),
                lag_conn: tokio::sync::Mutex::new(None),
                link: Arc::new(watch::Sender::new(ConnectionState::Connected)),
            }),
        }
    }

    /// Sends `body` until the broker answers, or `publish_timeout` passes.
    async fn request(&self, body: Request) -> Result<Response, BrokerError> {
        let cfg = &self.inner.cfg;
        let mut slot = self.inner.conn.lock().await;
        let mut conn = slot.take();
        let deadline = Instant::now() + cfg.publish_timeout;
        loop {
            match call(&mut conn, cfg, &self.inner.link, body.clone()).await {
                Ok(resp) => {
                    *slot = conn;
                    return Ok(resp);
                }
                Err(e) => {
                    if Instant::now() + cfg.backoff >= deadline {
                        return Err(BrokerError::Unavailable(e.to_string()));
                    }
                    tokio::time::sleep(cfg.backoff).await;
                }
            }
        }
    }
}

impl Broker for SimBroker {
    type Session = SimSession;

    async fn publish(&self, msg: Outbound) -> Result<Position, BrokerError> {
        let producer = self.inner.producer.as_ref().map(|(id, seq)| (*id, seq.fetch_add(1, Ordering::Relaxed)));
        let body =
            Request::Produce { topic: msg.topic, key: msg.key, headers: msg.headers, payload: msg.payload, producer };
        match self.request(body).await? {
            Response::Produced { partition, offset, duplicate } => Ok(Position { partition, offset, duplicate }),
            Response::Error { kind, message } => Err(broker_error(kind, message)),
            other => Err(BrokerError::Other(format!("unexpected response {other:?}"))),
        }
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<SimSession, BrokerError> {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let buffered = Arc::new(AtomicUsize::new(0));
        let driver = Driver {
            cfg: self.inner.cfg.clone(),
            group: group.to_string(),
            client: self.inner.client.clone(),
            history: self.inner.history.clone(),
            topics: topics.to_vec(),
            conn: None,
            member: None,
            previous: None,
            acked_events: 0,
            owned: BTreeSet::new(),
            positions: BTreeMap::new(),
            pending_release: BTreeSet::new(),
            last_ok: None,
            lost_ack: None,
            next_at: Instant::now(),
            events: ev_tx,
            buffered: buffered.clone(),
            link: self.inner.link.clone(),
        };
        // The group is joined lazily by the driver, like Kafka's subscribe.
        let join = tokio::spawn(driver.run(cmd_rx));
        Ok(SimSession { cmds: cmd_tx, events: ev_rx, buffered, join: Some(join) })
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), BrokerError> {
        match self.request(Request::EnsureTopic { topic: topic.to_string(), partitions }).await? {
            Response::Ok => Ok(()),
            Response::Error { kind, message } => Err(broker_error(kind, message)),
            other => Err(BrokerError::Other(format!("unexpected response {other:?}"))),
        }
    }

    fn connection_state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.link.subscribe()
    }

    async fn consumer_lag(&self, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>, BrokerError> {
        let body = Request::Lag { group: group.to_string(), topics: topics.to_vec() };
        let mut conn = self.inner.lag_conn.lock().await;
        match call(&mut conn, &self.inner.cfg, &self.inner.link, body).await {
            Ok(Response::Lag { partitions }) => Ok(partitions
                .into_iter()
                .map(|(tp, end_offset, committed)| PartitionLag { partition: unwire(&tp), end_offset, committed })
                .collect()),
            Ok(other) => Err(BrokerError::Other(format!("unexpected response {other:?}"))),
            Err(e) => Err(BrokerError::Unavailable(e.to_string())),
        }
    }
}

type Reply = oneshot::Sender<Result<(), BrokerError>>;

enum Cmd {
    Commit(Vec<(TopicPartition, u64)>, Reply),
    Release(Vec<TopicPartition>, Reply),
    SetTopics(Vec<String>, Reply),
    Leave(oneshot::Sender<()>),
}

/// What the driver hands the session; `ack` is fired when `next` returns it.
struct Item {
    event: SessionEvent,
    ack: Option<oneshot::Sender<()>>,
}

/// A group member on the simulated broker.
pub struct SimSession {
    cmds: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<Item>,
    buffered: Arc<AtomicUsize>,
    join: Option<JoinHandle<()>>,
}

impl SimSession {
    async fn command(&self, make: impl FnOnce(Reply) -> Cmd) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(make(tx)).map_err(|_| BrokerError::Closed)?;
        rx.await.map_err(|_| BrokerError::Closed)?
    }
}

impl Session for SimSession {
    async fn next(&mut self) -> Result<SessionEvent, BrokerError> {
        // `recv` is cancel-safe and everything after it is synchronous.
        let item = self.events.recv().await.ok_or(BrokerError::Closed)?;
        if let Some(ack) = item.ack {
            let _ = ack.send(());
        }
        if matches!(item.event, SessionEvent::Message(_)) {
            self.buffered.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(item.event)
    }

    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<(), BrokerError> {
        let offsets = offsets.to_vec();
        self.command(|r| Cmd::Commit(offsets, r)).await
    }

    async fn release(&mut self, partitions: &[TopicPartition]) -> Result<(), BrokerError> {
        let partitions = partitions.to_vec();
        self.command(|r| Cmd::Release(partitions, r)).await
    }

    async fn set_topics(&mut self, topics: &[String]) -> Result<(), BrokerError> {
        let topics = topics.to_vec();
        self.command(|r| Cmd::SetTopics(topics, r)).await
    }

    async fn close(mut self) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Leave(tx)).is_ok() {
            let _ = rx.await;
        }
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
        Ok(())
    }
}

struct Driver {
    cfg: ClientConfig,
    group: String,
    client: String,
    history: History,
    topics: Vec<String>,
    conn: Option<Conn>,
    member: Option<u64>,
    /// The member id given up as lost, removed by the broker on rejoin.
    previous: Option<u64>,
    acked_events: u64,
    owned: BTreeSet<TopicPartition>,
    /// Next offset to fetch of each owned, not revoked partition.
    positions: BTreeMap<TopicPartition, u64>,
    pending_release: BTreeSet<TopicPartition>,
    /// When the last request that the broker answered as our member was sent.
    last_ok: Option<Instant>,
    /// Set while a `Lost` waits to be taken by the consumer (no rejoin before).
    lost_ack: Option<oneshot::Receiver<()>>,
    next_at: Instant,
    events: mpsc::UnboundedSender<Item>,
    buffered: Arc<AtomicUsize>,
    link: Link,
}

enum Wake {
    Cmd(Option<Cmd>),
    LostTaken,
    Expired,
    Step,
}

impl Driver {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            let expiry = self
                .member
                .and(self.last_ok)
                .filter(|_| self.cfg.self_release)
                .map(|t| t + self.cfg.session_timeout.mul_f64(0.9));
            let next_at = self.next_at;
            let waiting_lost = self.lost_ack.is_some();
            let wake = {
                let lost = async {
                    match self.lost_ack.as_mut() {
                        Some(rx) => {
                            let _ = rx.await;
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    cmd = cmds.recv() => Wake::Cmd(cmd),
                    _ = lost, if waiting_lost => Wake::LostTaken,
                    _ = tokio::time::sleep_until(expiry.unwrap_or(next_at)), if expiry.is_some() => Wake::Expired,
                    _ = tokio::time::sleep_until(next_at), if !waiting_lost => Wake::Step,
                }
            };
            match wake {
                // The session was dropped: stop without leaving (like a crash).
                Wake::Cmd(None) => return,
                Wake::Cmd(Some(Cmd::Leave(done))) => {
                    self.leave().await;
                    let _ = done.send(());
                    return;
                }
                Wake::Cmd(Some(cmd)) => self.command(cmd).await,
                Wake::LostTaken => self.lost_ack = None,
                Wake::Expired => self.lose(),
                Wake::Step => self.step().await,
            }
        }
    }

    fn push(&self, event: SessionEvent, ack: Option<oneshot::Sender<()>>) {
        if matches!(event, SessionEvent::Message(_)) {
            self.buffered.fetch_add(1, Ordering::Relaxed);
        }
        // The session is gone when this fails; the next command says so.
        let _ = self.events.send(Item { event, ack });
    }

    /// Gives every partition up as lost and forgets the membership.
    fn lose(&mut self) {
        if let Some(member) = self.member.take() {
            self.previous = Some(member);
        }
        self.last_ok = None;
        self.acked_events = 0;
        self.positions.clear();
        self.pending_release.clear();
        let owned: Vec<TopicPartition> = std::mem::take(&mut self.owned).into_iter().collect();
        if !owned.is_empty() {
            self.history.record(Event::Lost { client: self.client.clone(), tps: owned.iter().map(hist_tp).collect() });
            let (tx, rx) = oneshot::channel();
            self.push(SessionEvent::Lost(owned), Some(tx));
            self.lost_ack = Some(rx);
        }
        self.next_at = Instant::now();
    }

    /// Calls the broker as our member; handles `UnknownMember` by losing.
    async fn member_call(&mut self, body: Request) -> Result<Response, BrokerError> {
        let sent = Instant::now();
        match call(&mut self.conn, &self.cfg, &self.link, body).await {
            Ok(Response::UnknownMember) => {
                self.lose();
                Err(BrokerError::CommitRejected { partition: String::new(), reason: "session expired".into() })
            }
            Ok(resp) => {
                if self.member.is_some() {
                    self.last_ok = Some(sent);
                }
                Ok(resp)
            }
            Err(e) => Err(BrokerError::Unavailable(e.to_string())),
        }
    }

    async fn step(&mut self) {
        let Some(member) = self.member else {
            let join = Request::Join {
                group: self.group.clone(),
                topics: self.topics.clone(),
                client: self.client.clone(),
                previous: self.previous,
            };
            let sent = Instant::now();
            match call(&mut self.conn, &self.cfg, &self.link, join).await {
                Ok(Response::Joined { member, .. }) => {
                    self.member = Some(member);
                    self.previous = None;
                    self.acked_events = 0;
                    self.last_ok = Some(sent);
                    self.next_at = Instant::now();
                }
                _ => self.next_at = Instant::now() + self.cfg.backoff,
            }
            return;
        };
        if !self.flush_releases(member).await {
            self.next_at = Instant::now() + self.cfg.backoff;
            return;
        }
        let room = self.buffered.load(Ordering::Relaxed) < self.cfg.buffer;
        let fetch: Vec<(WireTp, u64)> =
            if room { self.positions.iter().map(|(tp, pos)| (wire(tp), *pos)).collect() } else { Vec::new() };
        let poll = Request::Poll {
            group: self.group.clone(),
            member,
            ack_events: self.acked_events,
            fetch,
            max: self.cfg.fetch_max,
        };
        match self.member_call(poll).await {
            Ok(Response::Polled { events, messages, .. }) => {
                for (seq, event) in events {
                    if seq <= self.acked_events {
                        continue;
                    }
                    self.acked_events = seq;
                    match event {
                        WireEvent::Assigned(tps) => {
                            let mut assigned = Vec::new();
                            for (tp, start) in tps {
                                let tp = unwire(&tp);
                                self.owned.insert(tp.clone());
                                self.positions.insert(tp.clone(), start);
                                assigned.push(tp);
                            }
                            self.push(SessionEvent::Assigned(assigned), None);
                        }
                        WireEvent::Revoked(tps) => {
                            let tps: Vec<TopicPartition> = tps.iter().map(unwire).collect();
                            for tp in &tps {
                                self.positions.remove(tp);
                            }
                            self.push(SessionEvent::Revoked(tps), None);
                        }
                    }
                }
                let got = messages.len();
                for m in messages {
                    let tp = unwire(&m.tp);
                    // Only the exact next offset: never a gap, never twice.
                    if self.positions.get(&tp) != Some(&m.offset) {
                        continue;
                    }
                    self.positions.insert(tp.clone(), m.offset + 1);
                    self.push(
                        SessionEvent::Message(Delivery {
                            topic: tp.topic.clone(),
                            partition: tp.partition,
                            offset: m.offset,
                            key: m.key,
                            headers: m.headers,
                            payload: m.payload,
                            timestamp: Some(UNIX_EPOCH + Duration::from_millis(m.timestamp_ms)),
                            attempt: 1,
                        }),
                        None,
                    );
                }
                let more = got > 0 && self.buffered.load(Ordering::Relaxed) < self.cfg.buffer;
                self.next_at = if more { Instant::now() } else { Instant::now() + self.cfg.poll_interval };
            }
            Ok(_) => self.next_at = Instant::now() + self.cfg.poll_interval,
            Err(_) => {
                if self.lost_ack.is_none() && self.member.is_some() {
                    self.next_at = Instant::now() + self.cfg.backoff;
                }
            }
        }
    }

    /// Sends outstanding releases; false if the broker could not be reached.
    async fn flush_releases(&mut self, member: u64) -> bool {
        if self.pending_release.is_empty() {
            return true;
        }
        let partitions: Vec<WireTp> = self.pending_release.iter().map(wire).collect();
        match self.member_call(Request::Release { group: self.group.clone(), member, partitions }).await {
            Ok(_) => {
                self.pending_release.clear();
                true
            }
            Err(BrokerError::Unavailable(_)) => false,
            // Lost meanwhile: nothing is ours any more.
            Err(_) => true,
        }
    }

    async fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Commit(offsets, reply) => {
                let Some(member) = self.member else {
                    let _ = reply.send(Err(BrokerError::CommitRejected {
                        partition: String::new(),
                        reason: "not a group member".into(),
                    }));
                    return;
                };
                let offsets: Vec<(WireTp, u64)> = offsets.iter().map(|(tp, o)| (wire(tp), *o)).collect();
                let result =
                    match self.member_call(Request::Commit { group: self.group.clone(), member, offsets }).await {
                        Ok(Response::Ok) => Ok(()),
                        Ok(Response::Error { kind, message }) => Err(broker_error(kind, message)),
                        Ok(other) => Err(BrokerError::Other(format!("unexpected response {other:?}"))),
                        Err(e) => Err(e),
                    };
                let _ = reply.send(result);
            }
            Cmd::Release(tps, reply) => {
                for tp in &tps {
                    self.positions.remove(tp);
                    if self.owned.remove(tp) {
                        self.pending_release.insert(tp.clone());
                    }
                }
                let result = match self.member {
                    Some(member) => {
                        if self.flush_releases(member).await {
                            Ok(())
                        } else {
                            Err(BrokerError::Unavailable("release will be retried".into()))
                        }
                    }
                    None => Ok(()),
                };
                let _ = reply.send(result);
            }
            Cmd::SetTopics(topics, reply) => {
                self.topics = topics.clone();
                let result = match self.member {
                    Some(member) => self
                        .member_call(Request::SetTopics { group: self.group.clone(), member, topics })
                        .await
                        .map(|_| ()),
                    None => Ok(()),
                };
                let _ = reply.send(result);
            }
            Cmd::Leave(_) => unreachable!("handled by run"),
        }
    }

    async fn leave(&mut self) {
        if let Some(member) = self.member.take() {
            let leave = Request::Leave { group: self.group.clone(), member };
            let _ = call(&mut self.conn, &self.cfg, &self.link, leave).await;
        }
        self.conn = None;
    }
}
