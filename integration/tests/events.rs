//! Kubernetes Events about policies the agent cannot enforce as written: a real `agent run` on
//! one lab node, fed by the stand-in API server listening in that node's namespace
//! (`agents::StandIn`), which checks and stores the Events it is sent as the API server would.
//!
//! One Warning Event per unenforceable field, from the node elected for the policy; none for a
//! resync, a pod change or a fix; a count on the same Event when a problem comes back; and the
//! agent keeps syncing while the API refuses Events, logging the failure once.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use integration::agents::{http_get_in, logs, wait_for, Agent, StandIn};
use integration::apiserver::EventWrites;
use integration::lab::Lab;
use integration::{netns, objects};
use ruleset::model::{
    IpBlock, LabelSelector, Namespace, NetworkPolicy, Peer, Pod, PolicyPort, PolicyRule,
};
use ruleset::Cluster;
use serde_json::Value;

const LABPOD: &str = env!("CARGO_BIN_EXE_labpod");
const NODE: &str = "node-a";
/// Where the agent serves /metrics, inside its node's namespace.
const HEALTH: &str = "127.0.0.1:9743";
/// An upper bound for waiting, never a measure of speed.
const WAIT: Duration = Duration::from_secs(30);
/// After the agent handled a change, long enough for it to have offered its findings (once a
/// second) and posted them: an Event that has not come by then is not coming.
const QUIET: Duration = Duration::from_millis(2500);

fn pod(name: &str, node: &str, app: &str, ip: &str) -> Pod {
    Pod {
        namespace: "shop".into(),
        name: name.into(),
        node: Some(node.into()),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: vec![ip.parse().unwrap()],
        phase: Some("Running".into()),
        ..Pod::default()
    }
}

/// Ingress to app=`app` from 10.0.0.0/24, with `except` as written.
fn policy(name: &str, app: &str, except: &str) -> NetworkPolicy {
    NetworkPolicy {
        namespace: "shop".into(),
        name: name.into(),
        uid: Some(format!("uid-{name}")),
        pod_selector: LabelSelector {
            match_labels: [("app".to_string(), app.to_string())].into(),
            ..LabelSelector::default()
        },
        policy_types: vec!["Ingress".into()],
        ingress: vec![PolicyRule {
            peers: vec![Peer {
                ip_block: Some(IpBlock {
                    cidr: "10.0.0.0/24".into(),
                    except: vec![except.into()],
                }),
                ..Peer::default()
            }],
            ports: vec![],
        }],
        ..NetworkPolicy::default()
    }
}

/// `policy` with a port whose protocol does not exist: a second problem.
fn with_bad_port(mut policy: NetworkPolicy) -> NetworkPolicy {
    policy.ingress[0].ports.push(PolicyPort {
        protocol: Some("ICMP".into()),
        ..PolicyPort::default()
    });
    policy
}

/// Egress from app=web to a peer that names nothing.
fn empty_peer(name: &str) -> NetworkPolicy {
    NetworkPolicy {
        policy_types: vec!["Egress".into()],
        ingress: vec![],
        egress: vec![PolicyRule {
            peers: vec![Peer::default()],
            ports: vec![],
        }],
        ..policy(name, "web", "10.0.0.0/25")
    }
}

struct World {
    api: StandIn,
    agent: Agent,
    // Last: the agent must end before the lab removes its namespace.
    lab: Lab,
}

impl World {
    fn events(&self) -> Vec<Value> {
        self.api.server.events()
    }

    /// Waits until the stand-in holds `n` Events.
    fn wait_events(&mut self, n: usize, what: &str) {
        let started = Instant::now();
        while self.events().len() < n {
            assert!(
                started.elapsed() < WAIT,
                "{what}: {} of {n} Events within {WAIT:?}: {:#?}\n{}",
                self.events().len(),
                self.events(),
                logs(std::slice::from_mut(&mut self.agent))
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes a change, waits for the agent to take it, then long enough for any Event it
    /// would cause to arrive.
    fn change(&mut self, what: &str, change: impl FnOnce(&mut StandIn)) {
        let before = self.agent.mark().taken;
        change(&mut self.api);
        wait_for(std::slice::from_mut(&mut self.agent), what, WAIT, |_, a| {
            a.mark().taken > before
        });
        thread::sleep(QUIET);
    }

    /// Puts `policy` in the cluster, or replaces it.
    fn put_policy(&mut self, what: &str, policy: &NetworkPolicy) {
        self.change(what, |api| {
            api.change(|cluster| {
                cluster.apply_policy(policy.clone());
            });
        });
    }

    /// Warnings saying `text`.
    fn warnings(&self, text: &str) -> usize {
        self.agent
            .lines()
            .iter()
            .filter(|l| l.contains("WARN") && l.contains(text))
            .count()
    }

    /// The agent's /metrics, read inside its node's namespace.
    fn metrics(&self) -> String {
        http_get_in(self.lab.node_netns(0).unwrap(), HEALTH, "/metrics").expect("GET /metrics")
    }

    /// The Events created and patched so far, and that none was refused.
    fn assert_writes(&self, created: usize, patched: usize) {
        assert_eq!(
            self.api.server.event_writes(),
            EventWrites {
                created,
                patched,
                failed: 0
            },
            "{:#?}",
            self.events()
        );
    }

    fn metric(&self, line: &str) -> bool {
        self.metrics().lines().any(|l| l == line)
    }
}

/// The one Event about `field` of shop/`policy`.
fn event_about<'a>(events: &'a [Value], policy: &str, field: &str) -> &'a Value {
    let about: Vec<&Value> = events
        .iter()
        .filter(|e| e["regarding"]["name"] == policy && e["regarding"]["fieldPath"] == field)
        .collect();
    assert_eq!(about.len(), 1, "Events about {policy} {field}: {events:#?}");
    about[0]
}

#[test]
fn unenforceable_policies_become_one_event_per_field() {
    if netns::skip_unless_root("unenforceable_policies_become_one_event_per_field") {
        return;
    }
    let lab = Lab::new(LABPOD, 1).expect("lab");
    // web runs here; db only on node-b, which therefore reports db's policy: node-a must not.
    let web = policy("web-in", "web", "10.1.0.0/25");
    let cluster = Cluster::from_objects(
        [Namespace {
            name: "shop".into(),
            labels: Default::default(),
        }],
        [
            pod("web-0", NODE, "web", "10.244.1.10"),
            pod("db-0", "node-b", "db", "10.244.2.10"),
        ],
        [web.clone(), policy("db-in", "db", "10.2.0.0/25")],
    );
    let api = StandIn::start(&lab, 0, &cluster);
    let agent = Agent::start_api(Path::new(LABPOD), &lab, 0, NODE, &api.kubeconfig(), &[]);
    let mut world = World { api, agent, lab };
    let except = "spec.ingress[0].from[0].ipBlock.except[0]";
    let port = "spec.ingress[0].ports[0].protocol";

    // One Warning Event, naming the policy, its uid and the field.
    world.wait_events(1, "the first finding");
    thread::sleep(QUIET);
    let events = world.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    world.assert_writes(1, 0);
    let event = event_about(&events, "web-in", except);
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "Unenforceable");
    assert_eq!(event["action"], "FailClosed");
    assert_eq!(event["reportingController"], "nftpol.io/agent");
    assert_eq!(event["reportingInstance"], NODE);
    assert_eq!(event["metadata"]["namespace"], "shop");
    assert_eq!(event["regarding"]["kind"], "NetworkPolicy");
    assert_eq!(event["regarding"]["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(event["regarding"]["namespace"], "shop");
    assert_eq!(event["regarding"]["uid"], "uid-web-in");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with(&format!("{except}: 10.1.0.0/25 is not a strict subset")),
        "{note}"
    );
    assert!(note.contains("stay isolated"), "{note}");
    // Both findings are in the log, once each, whoever reports them.
    for policy in ["shop/web-in", "shop/db-in"] {
        let line = format!("networkpolicy {policy}: {except}");
        assert_eq!(world.warnings(&line), 1, "{line}");
    }

    // A resync (410, relist) and a pod change: nothing new, not even in the log.
    let relisted = r#"listed kind="NetworkPolicy""#;
    assert_eq!(world.agent.count(relisted), 1);
    world.change("a pod added while the watches are cut", |api| {
        let web1 = pod("web-1", NODE, "web", "10.244.1.11");
        api.server
            .put_unseen_and_compact(objects::pod(&web1))
            .unwrap();
        api.cluster.apply_pod(web1);
    });
    let started = Instant::now();
    while world.agent.count(relisted) < 2 {
        assert!(
            started.elapsed() < WAIT,
            "no relist of the policies:\n{}",
            world.agent.lines().join("\n")
        );
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(QUIET);
    world.assert_writes(1, 0);
    assert_eq!(
        world.warnings(&format!("networkpolicy shop/web-in: {except}")),
        1
    );

    // A second problem in the same policy: its own Event; the first is not repeated.
    let broken_twice = with_bad_port(web.clone());
    world.put_policy("the second problem", &broken_twice);
    world.wait_events(2, "the second finding");
    thread::sleep(QUIET);
    world.assert_writes(2, 0);
    let events = world.events();
    let second = event_about(&events, "web-in", port);
    assert!(
        second["note"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{port}: unknown protocol \"ICMP\"")),
        "{second:#?}"
    );
    event_about(&events, "web-in", except);

    // Fixed: no Event, a line saying so.
    world.put_policy("the fix", &policy("web-in", "web", "10.0.0.0/25"));
    world.assert_writes(2, 0);
    assert_eq!(
        world.agent.count("resolved"),
        2,
        "{:?}",
        world.agent.lines()
    );

    // Broken again the same way within minutes: the same Events count 2, none is added.
    world.put_policy("the problems coming back", &broken_twice);
    let started = Instant::now();
    while world.api.server.event_writes().patched < 2 && started.elapsed() < WAIT {
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(QUIET);
    world.assert_writes(2, 2);
    let events = world.events();
    for field in [except, port] {
        let series = &event_about(&events, "web-in", field)["series"];
        assert_eq!(series["count"], 2, "{events:#?}");
    }

    // The API refuses Events: the agent syncs all the same, logs the failure once per minute
    // and counts each.
    for (i, code) in [StatusCode::FORBIDDEN, StatusCode::INTERNAL_SERVER_ERROR]
        .into_iter()
        .enumerate()
    {
        world.api.server.refuse_events(Some(code));
        let synced = world.agent.synced();
        world.put_policy(
            "a new policy while Events are refused",
            &empty_peer(&format!("refused-{i}")),
        );
        assert!(
            world.agent.synced() > synced,
            "the new policy was not synced"
        );
        let failed = format!("nftpol_events_total{{result=\"failed\"}} {}", i + 1);
        assert!(
            world.metric(&failed),
            "no {failed:?} in\n{}",
            world.metrics()
        );
    }
    assert_eq!(world.warnings("cannot record a Kubernetes Event"), 1);
    assert!(world.agent.exit_status().is_none(), "the agent exited");

    // Served again: the next finding is recorded.
    world.api.server.refuse_events(None);
    world.put_policy("a new policy once Events are served", &empty_peer("served"));
    world.wait_events(3, "the finding after the refusals");
    event_about(&world.events(), "served", "spec.egress[0].to[0]");
    assert_eq!(
        world.api.server.event_writes(),
        EventWrites {
            created: 3,
            patched: 2,
            failed: 2
        }
    );
    for line in [
        "nftpol_events_total{result=\"created\"} 3",
        "nftpol_events_total{result=\"aggregated\"} 2",
        "nftpol_events_total{result=\"failed\"} 2",
        "nftpol_events_total{result=\"dropped\"} 0",
        // db-in's, web-in's two, refused-0's, refused-1's and served's.
        "nftpol_unenforceable_fields 6",
    ] {
        assert!(world.metric(line), "no {line:?} in\n{}", world.metrics());
    }
    assert!(
        !world
            .events()
            .iter()
            .any(|e| e["regarding"]["name"] == "db-in"),
        "node-a reported a policy that selects only node-b's pods"
    );
}
