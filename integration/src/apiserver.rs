//! A stand-in for the Kubernetes API server: Pods, Namespaces and NetworkPolicies over plain
//! HTTP on 127.0.0.1 or on an address in a network namespace, speaking the list/watch protocol
//! kube-rs and client-go use.
//!
//! ```text
//! test -> ApiServer::put / delete (raw JSON) -> State: objects + bounded history, one global RV
//!   GET .../pods?limit&continue          -> PodList page, metadata.resourceVersion, continue
//!   GET .../pods?watch=true&resourceVersion=N -> chunked JSON lines: history after N, then live
//!                                              events and BOOKMARKs; N compacted -> ERROR 410
//!   POST  /apis/events.k8s.io/v1/namespaces/NS/events       -> validated, stored (or refused)
//!   PATCH /apis/events.k8s.io/v1/namespaces/NS/events/NAME  -> JSON merge patch (a series)
//! ```
//!
//! Tests steer it: compact the history (the next watch from an old version gets 410 Expired),
//! drop every connection mid-stream, stop and restart on the same port, count requests, read
//! the Events recorded, refuse them with a status of their choice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};

/// The resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Pods,
    Namespaces,
    NetworkPolicies,
}

impl Resource {
    pub const ALL: [Resource; 3] = [
        Resource::Pods,
        Resource::Namespaces,
        Resource::NetworkPolicies,
    ];

    fn path(self) -> &'static str {
        match self {
            Resource::Pods => "/api/v1/pods",
            Resource::Namespaces => "/api/v1/namespaces",
            Resource::NetworkPolicies => "/apis/networking.k8s.io/v1/networkpolicies",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::Pods | Resource::Namespaces => "v1",
            Resource::NetworkPolicies => "networking.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Pods => "Pod",
            Resource::Namespaces => "Namespace",
            Resource::NetworkPolicies => "NetworkPolicy",
        }
    }

    /// The resource an object's `kind` names.
    pub fn of(object: &Value) -> Option<Resource> {
        let kind = object.get("kind")?.as_str()?;
        Resource::ALL.into_iter().find(|r| r.kind() == kind)
    }
}

/// List or watch, for request counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    List,
    Watch,
}

/// How the stand-in behaves; the defaults suit tests.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Events kept for watches that resume; older resourceVersions get 410 Expired.
    pub history: usize,
    /// How often open watches that asked for them get a BOOKMARK.
    pub bookmark_every: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            history: 10_000,
            bookmark_every: Duration::from_millis(500),
        }
    }
}

/// `namespace/name`; the namespace is empty for a Namespace.
type Key = (String, String);

#[derive(Default)]
struct State {
    rv: u64,
    objects: HashMap<Resource, BTreeMap<Key, Bytes>>,
    /// Recent events, oldest first, as (resourceVersion, resource, watch line).
    history: VecDeque<(u64, Resource, Bytes)>,
    /// Events at or below this resourceVersion are gone from the history.
    compacted: u64,
    watches: BTreeMap<u64, Watch>,
    /// Remaining pages of chunked lists, by continue token.
    pages: HashMap<String, (u64, Resource, Vec<Bytes>)>,
    connections: BTreeMap<u64, AbortHandle>,
    requests: BTreeMap<(Resource, Verb), usize>,
    next_id: u64,
    /// events.k8s.io/v1 Events, in order of creation.
    events: Vec<Value>,
    event_writes: EventWrites,
    /// When set, every Event request gets this status.
    refuse_events: Option<StatusCode>,
}

/// Event requests served so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventWrites {
    /// POSTs that created an Event.
    pub created: usize,
    /// PATCHes applied to one.
    pub patched: usize,
    /// Requests answered with an error: refused on purpose, invalid, or about a missing Event.
    pub failed: usize,
}

struct Watch {
    resource: Resource,
    bookmarks: bool,
    lines: mpsc::UnboundedSender<Bytes>,
}

/// The running stand-in. Dropped, it stops.
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    settings: Settings,
    addr: SocketAddr,
    /// The network namespace it listens in; `None` for the test's own.
    netns: Option<PathBuf>,
    tasks: Vec<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves an empty cluster on a free port of 127.0.0.1.
    pub async fn start(settings: Settings) -> std::io::Result<Self> {
        Self::start_in(settings, None, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves an empty cluster on `addr` (port 0: a free one) inside the network namespace
    /// `netns` (a `/run/netns/<name>` path) when given, so that processes in that namespace,
    /// or routed to it, reach it. Call it on a runtime that keeps running.
    pub async fn start_in(
        settings: Settings,
        netns: Option<&Path>,
        addr: SocketAddr,
    ) -> std::io::Result<Self> {
        let netns = netns.map(Path::to_path_buf);
        let listener = bind(netns.as_deref(), addr)?;
        let addr = listener.local_addr()?;
        let mut server = Self {
            state: Arc::default(),
            settings,
            addr,
            netns,
            tasks: Vec::new(),
        };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = Arc::clone(&self.state);
        let settings = self.settings;
        self.tasks.push(tokio::spawn(accept(listener, state)));
        let state = Arc::clone(&self.state);
        self.tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(settings.bookmark_every);
            loop {
                ticker.tick().await;
                send_bookmarks(&mut lock(&state));
            }
        }));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig whose current context points at this server.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let url = self.url();
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters:\n- name: stand-in\n  cluster:\n    server: {url}\n\
                 users:\n- name: stand-in\n  user: {{}}\n\
                 contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\n\
                 current-context: stand-in\n"
            ),
        )
    }

    /// Creates or replaces an object, whatever the rest of its content, as long as `kind` is
    /// one served. Returns the resourceVersion it got.
    pub fn put(&self, object: Value) -> Option<u64> {
        let mut state = lock(&self.state);
        self.put_locked(&mut state, object)
    }

    /// Like [`ApiServer::put`], but with every connection cut first and the history compacted
    /// after, all under one lock: no watch sees the change, and every watch that resumes does
    /// so from a compacted resourceVersion, so it gets 410 Expired and must list again.
    pub fn put_unseen_and_compact(&self, object: Value) -> Option<u64> {
        let mut state = lock(&self.state);
        cut(&mut state);
        let rv = self.put_locked(&mut state, object);
        compact(&mut state);
        rv
    }

    fn put_locked(&self, state: &mut State, mut object: Value) -> Option<u64> {
        let resource = Resource::of(&object)?;
        let key = key_of(resource, &object);
        state.rv += 1;
        let rv = state.rv;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let bytes = Bytes::from(object.to_string());
        let existed = state
            .objects
            .entry(resource)
            .or_default()
            .insert(key, bytes.clone())
            .is_some();
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        self.record(state, resource, kind, &bytes);
        Some(rv)
    }

    /// Deletes an object; whether it was there.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let namespace = match resource {
            Resource::Namespaces => "",
            _ => namespace,
        };
        let mut state = lock(&self.state);
        let Some(old) = state
            .objects
            .get_mut(&resource)
            .and_then(|objects| objects.remove(&(namespace.to_string(), name.to_string())))
        else {
            return false;
        };
        state.rv += 1;
        let rv = state.rv;
        let mut object: Value = serde_json::from_slice(&old).unwrap_or(Value::Null);
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        self.record(
            &mut state,
            resource,
            "DELETED",
            &Bytes::from(object.to_string()),
        );
        true
    }

    fn record(&self, state: &mut State, resource: Resource, kind: &str, object: &Bytes) {
        let line = watch_line(kind, object);
        let rv = state.rv;
        state.history.push_back((rv, resource, line.clone()));
        while state.history.len() > self.settings.history {
            if let Some((old, _, _)) = state.history.pop_front() {
                state.compacted = old;
            }
        }
        state
            .watches
            .retain(|_, w| w.resource != resource || w.lines.send(line.clone()).is_ok());
    }

    /// Forgets the event history, as etcd compaction does: a watch resuming from any earlier
    /// resourceVersion, or a list continuing an earlier page, gets 410 Gone.
    pub fn compact(&self) {
        compact(&mut lock(&self.state));
    }

    /// Cuts every open connection, in the middle of whatever it was sending.
    pub fn drop_connections(&self) {
        cut(&mut lock(&self.state));
    }

    /// Stops listening and cuts every connection; the objects stay for [`ApiServer::restart`].
    pub fn stop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.drop_connections();
    }

    /// Listens again on the same address, in the same network namespace.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        // The aborted accept task drops the old listener when the runtime next polls it.
        let mut tries = 0;
        let listener = loop {
            match bind(self.netns.as_deref(), self.addr) {
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => break other?,
            }
        };
        self.serve(listener);
        Ok(())
    }

    /// Requests served so far, by resource and verb.
    pub fn requests(&self, resource: Resource, verb: Verb) -> usize {
        lock(&self.state)
            .requests
            .get(&(resource, verb))
            .copied()
            .unwrap_or(0)
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.state).rv
    }

    /// Every Event recorded, in order of creation, as patched since.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.state).events.clone()
    }

    pub fn event_writes(&self) -> EventWrites {
        lock(&self.state).event_writes
    }

    /// From now on, answers every Event request with `status` (403 as without RBAC, 500, ...);
    /// `None` serves them again.
    pub fn refuse_events(&self, status: Option<StatusCode>) {
        lock(&self.state).refuse_events = status;
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listener on `addr`, created in network namespace `netns` when given: a socket stays in
/// the namespace it was made in, so a thread enters the namespace, binds, and ends.
fn bind(netns: Option<&Path>, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = match netns {
        None => std::net::TcpListener::bind(addr)?,
        Some(path) => crate::netns::inside(path, || std::net::TcpListener::bind(addr))?,
    };
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// The state stays usable after a panic elsewhere: every change to it is complete when made.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn compact(state: &mut State) {
    state.history.clear();
    state.compacted = state.rv;
    state.pages.clear();
}

fn cut(state: &mut State) {
    state.watches.clear();
    for (_, connection) in std::mem::take(&mut state.connections) {
        connection.abort();
    }
}

fn key_of(resource: Resource, object: &Value) -> Key {
    let meta = object.get("metadata");
    let text = |field: &str| {
        meta.and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    match resource {
        Resource::Namespaces => (String::new(), text("name")),
        _ => (text("namespace"), text("name")),
    }
}

fn watch_line(kind: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(br#"{"type":""#);
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(br#"","object":"#);
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn send_bookmarks(state: &mut State) {
    let rv = state.rv.to_string();
    state.watches.retain(|_, w| {
        if !w.bookmarks {
            return true;
        }
        let bookmark = json!({
            "type": "BOOKMARK",
            "object": {
                "apiVersion": w.resource.api_version(),
                "kind": w.resource.kind(),
                "metadata": {"resourceVersion": rv},
            },
        });
        w.lines.send(Bytes::from(format!("{bookmark}\n"))).is_ok()
    });
}

async fn accept(listener: TcpListener, state: Arc<Mutex<State>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let mut guard = lock(&state);
        guard.next_id += 1;
        let id = guard.next_id;
        let served = Arc::clone(&state);
        let connection = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = Arc::clone(&served);
                async move { Ok::<_, Infallible>(respond(&state, request).await) }
            });
            // A client that goes away mid-stream is no error of the server's.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        guard.connections.insert(id, connection.abort_handle());
        guard.connections.retain(|_, c| !c.is_finished());
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn respond(state: &Arc<Mutex<State>>, request: Request<Incoming>) -> Response<Body> {
    match event_route(request.uri().path()) {
        Some((namespace, name)) => {
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut state = lock(state);
            let response = event_request(&mut state, &parts, &namespace, name.as_deref(), &body);
            match response.status() {
                StatusCode::CREATED => state.event_writes.created += 1,
                StatusCode::OK => state.event_writes.patched += 1,
                _ => state.event_writes.failed += 1,
            }
            response
        }
        None => handle(state, &request),
    }
}

/// The namespace, and the name if any, of an events.k8s.io/v1 Event path.
fn event_route(path: &str) -> Option<(String, Option<String>)> {
    let rest = path.strip_prefix("/apis/events.k8s.io/v1/namespaces/")?;
    let (namespace, rest) = rest.split_once('/')?;
    let name = match rest {
        "events" => None,
        _ => Some(rest.strip_prefix("events/")?.to_string()),
    };
    Some((namespace.to_string(), name))
}

/// POST (create) or PATCH (JSON merge patch) of an Event, checked as the API server checks
/// an events.k8s.io/v1 Event.
fn event_request(
    state: &mut State,
    request: &hyper::http::request::Parts,
    namespace: &str,
    name: Option<&str>,
    body: &[u8],
) -> Response<Body> {
    if let Some(code) = state.refuse_events {
        let reason = code
            .canonical_reason()
            .unwrap_or("Refused")
            .replace(' ', "");
        return status(code, &reason, "refused by the test");
    }
    let Ok(sent) = serde_json::from_slice::<Value>(body) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON",
        );
    };
    let at = |event: &Value, namespace: &str, name: &str| {
        event["metadata"]["namespace"] == namespace && event["metadata"]["name"] == name
    };
    match (&request.method, name) {
        (&hyper::Method::POST, None) => {
            let mut event = sent;
            if let Err(problem) = check_event(&event, namespace, false) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &problem);
            }
            let name = event["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if state.events.iter().any(|e| at(e, namespace, &name)) {
                return status(StatusCode::CONFLICT, "AlreadyExists", &name);
            }
            state.next_id += 1;
            event["metadata"]["uid"] = json!(format!("event-{}", state.next_id));
            event["metadata"]["resourceVersion"] = json!(state.next_id.to_string());
            state.events.push(event.clone());
            json_response(
                StatusCode::CREATED,
                Full::new(Bytes::from(event.to_string())).boxed(),
            )
        }
        (&hyper::Method::PATCH, Some(name)) => {
            let merge = request
                .headers
                .get(hyper::header::CONTENT_TYPE)
                .is_some_and(|t| t == "application/merge-patch+json");
            if !merge {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "only application/merge-patch+json",
                );
            }
            let Some(event) = state.events.iter_mut().find(|e| at(e, namespace, name)) else {
                return status(StatusCode::NOT_FOUND, "NotFound", name);
            };
            let mut patched = event.clone();
            merge_patch(&mut patched, &sent);
            if let Err(problem) = check_event(&patched, namespace, true) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &problem);
            }
            *event = patched.clone();
            json_response(
                StatusCode::OK,
                Full::new(Bytes::from(patched.to_string())).boxed(),
            )
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "events: POST to the collection, PATCH to an event",
        ),
    }
}

/// What the API server requires of an events.k8s.io/v1 Event; `existing` once created.
fn check_event(event: &Value, namespace: &str, existing: bool) -> Result<(), String> {
    let text = |field: &str| event[field].as_str().unwrap_or_default();
    let required_short = [
        "reason",
        "action",
        "reportingController",
        "reportingInstance",
    ];
    for field in required_short {
        if text(field).is_empty() || text(field).len() > 128 {
            return Err(format!("{field}: required, at most 128 bytes"));
        }
    }
    if !text("reportingController").contains('/') {
        return Err("reportingController: a qualified name, domain/name".into());
    }
    if text("note").len() > 1024 {
        return Err("note: at most 1024 bytes".into());
    }
    if !matches!(text("type"), "Normal" | "Warning") {
        return Err("type: Normal or Warning".into());
    }
    if text("eventTime").is_empty() {
        return Err("eventTime: required".into());
    }
    if event["metadata"]["namespace"] != namespace {
        return Err("metadata.namespace: does not match the request's".into());
    }
    let name = event["metadata"]["name"].as_str().unwrap_or_default();
    if name.is_empty() || name.len() > 253 {
        return Err("metadata.name: required, at most 253 bytes".into());
    }
    if event["regarding"]["kind"].as_str().is_none()
        || event["regarding"]["name"].as_str().is_none()
    {
        return Err("regarding: kind and name required".into());
    }
    match event.get("series").filter(|s| !s.is_null()) {
        Some(_) if !existing => Err("series: not on a new event".into()),
        Some(series)
            if series["count"].as_i64().unwrap_or(0) < 2
                || series["lastObservedTime"].as_str().is_none() =>
        {
            Err("series: count of at least 2 and lastObservedTime".into())
        }
        _ => Ok(()),
    }
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(object) = target {
        for (key, value) in fields {
            if value.is_null() {
                object.remove(key);
            } else {
                merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn handle(state: &Arc<Mutex<State>>, request: &Request<Incoming>) -> Response<Body> {
    let path = request.uri().path();
    let Some(resource) = Resource::ALL.into_iter().find(|r| r.path() == path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{path}: not served"),
        );
    };
    let query: HashMap<String, String> =
        form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let flag = |name: &str| matches!(query.get(name).map(String::as_str), Some("true" | "1"));
    if flag("watch") {
        watch(state, resource, &query, flag("allowWatchBookmarks"))
    } else {
        list(state, resource, &query)
    }
}

fn list(
    state: &Arc<Mutex<State>>,
    resource: Resource,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let mut state = lock(state);
    *state.requests.entry((resource, Verb::List)).or_default() += 1;
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let (rv, mut items) = match query.get("continue") {
        Some(token) => match state.pages.remove(token) {
            Some((rv, r, items)) if r == resource => (rv, items),
            _ => return status(
                StatusCode::GONE,
                "Expired",
                "the provided continue parameter is too old to display a consistent list result",
            ),
        },
        None => (
            state.rv,
            state
                .objects
                .get(&resource)
                .map(|objects| objects.values().cloned().collect())
                .unwrap_or_default(),
        ),
    };
    let mut next = String::new();
    if let Some(limit) = limit.filter(|&l| l < items.len()) {
        let rest = items.split_off(limit);
        state.next_id += 1;
        next = format!("{rv}-{}", state.next_id);
        state.pages.insert(next.clone(), (rv, resource, rest));
    }
    drop(state);
    let size = items.iter().map(Bytes::len).sum::<usize>() + items.len() + 256;
    let mut body = Vec::with_capacity(size);
    let mut head = String::new();
    let _ = write!(
        head,
        r#"{{"apiVersion":"{}","kind":"{}List","metadata":{{"resourceVersion":"{rv}""#,
        resource.api_version(),
        resource.kind()
    );
    if !next.is_empty() {
        let _ = write!(head, r#","continue":"{next}""#);
    }
    head.push_str(r#"},"items":["#);
    body.extend_from_slice(head.as_bytes());
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    json_response(StatusCode::OK, Full::new(Bytes::from(body)).boxed())
}

fn watch(
    state: &Arc<Mutex<State>>,
    resource: Resource,
    query: &HashMap<String, String>,
    bookmarks: bool,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let mut guard = lock(state);
    *guard.requests.entry((resource, Verb::Watch)).or_default() += 1;
    let from = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse::<u64>().ok())
        .unwrap_or(0);
    if from == 0 {
        // "Any": the current state as ADDED events, then changes.
        for object in guard
            .objects
            .get(&resource)
            .into_iter()
            .flat_map(|o| o.values())
        {
            let _ = tx.send(watch_line("ADDED", object));
        }
    } else if from < guard.compacted {
        let expired = json!({
            "type": "ERROR",
            "object": status_object(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", guard.compacted + 1),
            ),
        });
        let _ = tx.send(Bytes::from(format!("{expired}\n")));
        drop(tx);
        drop(guard);
        return json_response(StatusCode::OK, stream_body(rx));
    } else {
        for (_, _, line) in guard
            .history
            .iter()
            .filter(|(rv, r, _)| *rv > from && *r == resource)
        {
            let _ = tx.send(line.clone());
        }
    }
    guard.next_id += 1;
    let id = guard.next_id;
    guard.watches.insert(
        id,
        Watch {
            resource,
            bookmarks,
            lines: tx,
        },
    );
    drop(guard);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let state = Arc::clone(state);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(timeout)).await;
        lock(&state).watches.remove(&id);
    });
    json_response(StatusCode::OK, stream_body(rx))
}

fn stream_body(rx: mpsc::UnboundedReceiver<Bytes>) -> Body {
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    StreamBody::new(frames).boxed()
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = status_object(code.as_u16(), reason, message).to_string();
    json_response(code, Full::new(Bytes::from(body)).boxed())
}

fn json_response(code: StatusCode, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
