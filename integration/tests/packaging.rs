//! `packaging/`: the systemd unit is accepted by `systemd-analyze verify` and keeps the
//! privileges and hardening it documents; every Kubernetes manifest parses as the type its
//! `kind` names with no field lost on the way (a misspelled field would vanish); the RBAC grants
//! exactly what the agent reads and writes; the DaemonSet has what the agent needs on a node;
//! and the Dockerfile copies only files that exist.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration::agents::agent_binary;
use integration::{read_text, workspace};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::Value;

const LABPOD: &str = env!("CARGO_BIN_EXE_labpod");
const UNIT: &str = "nftpol-agent.service";
/// Where the unit, the README and the Dockerfile put the binary.
const INSTALLED_BINARY: &str = "/usr/local/bin/agent";

fn packaging(path: &str) -> PathBuf {
    workspace().join("packaging").join(path)
}

// ---- systemd ---------------------------------------------------------------------------------

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// The unit's `Key=value` lines, in order, comments and section headers left out.
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (key, value) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not Key=value: {l}"));
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    if !on_path("systemd-analyze") {
        assert!(
            !integration::netns::is_root(),
            "systemd-analyze is missing: scripts/setup.sh installs the systemd package"
        );
        eprintln!("\n!!!!! SKIPPED systemd_analyze_verify_accepts_the_unit: systemd-analyze is not installed (scripts/setup.sh installs it as root) !!!!!\n");
        return;
    }
    let unit = read_text(&packaging(&format!("systemd/{UNIT}")));
    assert!(unit.contains(&format!("ExecStart={INSTALLED_BINARY} ")));
    // verify checks that ExecStart's binary exists: point it at this build's agent.
    let agent = agent_binary(Path::new(LABPOD));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(UNIT);
    fs::write(
        &path,
        unit.replace(INSTALLED_BINARY, agent.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are warnings on stderr with exit status 0: both must be clean.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {}: {}\n{stderr}",
        path.display(),
        out.status
    );
}

#[test]
fn the_unit_keeps_its_privileges_and_hardening() {
    let settings = unit_settings(&read_text(&packaging(&format!("systemd/{UNIT}"))));
    let one = |key: &str| -> &str {
        match setting(&settings, key)[..] {
            [value] => value,
            ref values => panic!("{key}: expected one setting, found {values:?}"),
        }
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_ne!(one("WatchdogSec"), "0");
    assert_eq!(one("Restart"), "always");
    assert_eq!(one("User"), "root");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_ADMIN");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_ADMIN");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    // /proc/sys read-only except the bridge sysctls the agent turns on.
    assert_eq!(one("ProtectKernelTunables"), "yes");
    assert_eq!(one("ReadWritePaths"), "-/proc/sys/net/bridge");
    let families: BTreeSet<&str> = one("RestrictAddressFamilies").split(' ').collect();
    assert_eq!(
        families,
        BTreeSet::from(["AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"])
    );
    // Any of these would cut the agent off the host's network namespace, its /proc/sys or its
    // root-only kubeconfig.
    for forbidden in [
        "PrivateNetwork",
        "PrivateUsers",
        "ProcSubset",
        "DynamicUser",
    ] {
        assert!(setting(&settings, forbidden).is_empty(), "{forbidden}");
    }

    // The environment file sets only variables the unit uses, and the unit has a default for
    // each of them.
    let exec_start = one("ExecStart");
    let defaults: BTreeSet<&str> = setting(&settings, "Environment")
        .iter()
        .map(|v| v.split_once('=').unwrap().0)
        .collect();
    let env_file = read_text(&packaging("systemd/nftpol-agent.env"));
    let mut seen = BTreeSet::new();
    for line in env_file.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (var, _) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("nftpol-agent.env: not VAR=value: {line}"));
        seen.insert(var);
    }
    for var in seen.iter().chain(&defaults) {
        assert!(
            exec_start.contains(&format!("${{{var}}}")) || exec_start.contains(&format!("${var}")),
            "{var} is set but ExecStart does not use it"
        );
        assert!(defaults.contains(var), "{var} has no default in the unit");
    }
    assert_eq!(
        one("EnvironmentFile"),
        "-/etc/nftpol/nftpol-agent.env",
        "the README installs the environment file there"
    );
}

// ---- Kubernetes ------------------------------------------------------------------------------

/// Every document of every `packaging/kubernetes/*.yaml`, with the file it came from.
fn manifests() -> Vec<(String, Value)> {
    let dir = packaging("kubernetes");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for doc in serde_yaml_ng::Deserializer::from_str(&read_text(&file)) {
            let value = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            docs.push((name.clone(), value));
        }
    }
    docs
}

/// Paths in `original` that `round_trip` lacks: a field the typed struct does not know.
fn lost_fields(original: &Value, round_trip: &Value, at: &str, lost: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let path = format!("{at}.{key}");
                match b.get(key) {
                    Some(other) => lost_fields(value, other, &path, lost),
                    None => lost.push(path),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                lost.push(format!("{at} (length {} became {})", a.len(), b.len()));
            }
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost_fields(x, y, &format!("{at}[{i}]"), lost);
            }
        }
        _ => {}
    }
}

/// Parses `doc` as `T` and checks that serializing it back keeps every field of the document.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(file: &str, doc: &Value) -> T {
    let kind = doc["kind"].as_str().unwrap_or("?");
    let parsed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {kind} does not parse as one: {e}"));
    let mut lost = Vec::new();
    lost_fields(doc, &serde_json::to_value(&parsed).unwrap(), "", &mut lost);
    assert!(
        lost.is_empty(),
        "{file}: {kind} has fields its type does not know: {lost:?}"
    );
    parsed
}

#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemon_sets: Vec<DaemonSet>,
}

fn objects() -> Objects {
    let mut objects = Objects::default();
    for (file, doc) in manifests() {
        match doc["kind"].as_str() {
            Some("Namespace") => objects.namespaces.push(typed(&file, &doc)),
            Some("ServiceAccount") => objects.service_accounts.push(typed(&file, &doc)),
            Some("ClusterRole") => objects.cluster_roles.push(typed(&file, &doc)),
            Some("ClusterRoleBinding") => objects.bindings.push(typed(&file, &doc)),
            Some("DaemonSet") => objects.daemon_sets.push(typed(&file, &doc)),
            other => panic!("{file}: unexpected kind {other:?}"),
        }
    }
    objects
}

#[test]
fn every_manifest_parses_as_its_kind_with_no_unknown_field() {
    let objects = objects();
    assert_eq!(objects.service_accounts.len(), 1);
    assert_eq!(objects.cluster_roles.len(), 1);
    assert_eq!(objects.bindings.len(), 1);
    assert_eq!(objects.daemon_sets.len(), 1);
}

#[test]
fn a_misspelled_field_is_caught() {
    let doc: Value = serde_yaml_ng::from_str(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, namespce: b}\n",
    )
    .unwrap();
    let parsed: ServiceAccount = serde_json::from_value(doc.clone()).unwrap();
    let mut lost = Vec::new();
    lost_fields(&doc, &serde_json::to_value(parsed).unwrap(), "", &mut lost);
    assert_eq!(lost, [".metadata.namespce"]);
}

#[test]
fn rbac_grants_reading_pods_namespaces_policies_and_recording_events_only() {
    let objects = objects();
    let role = &objects.cluster_roles[0];
    let mut granted = BTreeSet::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert((group.as_str(), resource.as_str(), verb.as_str()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert((group, resource, verb));
        }
    }
    for verb in ["create", "patch"] {
        expected.insert(("events.k8s.io", "events", verb));
    }
    assert_eq!(granted, expected);
    assert!(role.aggregation_rule.is_none());

    let account = &objects.service_accounts[0];
    let binding = &objects.bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
}

fn env_field_path<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .as_deref()?
        .iter()
        .find(|e| e.name == name)?
        .value_from
        .as_ref()?
        .field_ref
        .as_ref()
        .map(|f| f.field_path.as_str())
}

#[test]
fn the_daemon_set_runs_the_agent_on_every_node_with_what_it_needs() {
    let objects = objects();
    let ds = &objects.daemon_sets[0];
    let account = &objects.service_accounts[0];
    assert_eq!(ds.metadata.namespace, account.metadata.namespace);
    let spec = &ds.spec;
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name, account.metadata.name);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations.iter().any(|t| t.key.is_none()
            && t.operator.as_deref() == Some("Exists")
            && t.effect.is_none()),
        "no toleration of every taint: {tolerations:?}"
    );

    let [agent] = &pod.containers[..] else {
        panic!("one container expected")
    };
    let security = agent.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_owned()][..]));
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(env_field_path(agent, "NODE_NAME"), Some("spec.nodeName"));
    assert_eq!(env_field_path(agent, "HOST_IP"), Some("status.hostIP"));
    let resources = agent.resources.as_ref().unwrap();
    assert!(resources.requests.as_ref().unwrap().contains_key("memory"));
    assert!(resources.limits.as_ref().unwrap().contains_key("memory"));

    // The probes reach the port the agent serves health on.
    let args = agent.args.as_deref().unwrap_or_default();
    let health_addr = args
        .iter()
        .position(|a| a == "--health-addr")
        .map(|i| args[i + 1].as_str())
        .expect("--health-addr");
    let (host, port) = health_addr.rsplit_once(':').unwrap();
    assert_eq!(host, "$(HOST_IP)");
    let ports: BTreeMap<&str, i32> = agent
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| (p.name.as_deref().unwrap_or_default(), p.container_port))
        .collect();
    for (probe, path) in [
        (&agent.liveness_probe, "/healthz"),
        (&agent.readiness_probe, "/readyz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        let probed = match &get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => {
                ports[&name[..]]
            }
        };
        assert_eq!(probed.to_string(), port, "{path}");
    }

    // The one container that writes the bridge sysctls holds no capability at all.
    for init in pod.init_containers.as_deref().unwrap_or_default() {
        let security = init.security_context.as_ref().unwrap();
        assert_ne!(security.privileged, Some(true), "{}", init.name);
        let caps = security.capabilities.as_ref().unwrap();
        assert!(caps.add.is_none(), "{}", init.name);
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert_eq!(init.image, agent.image, "{}", init.name);
    }
}

// ---- Dockerfile ------------------------------------------------------------------------------

#[test]
fn the_dockerfile_copies_files_that_exist_and_runs_the_agent() {
    let dockerfile = read_text(&packaging("Dockerfile"));
    let mut copied = 0;
    for line in dockerfile.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        if rest.starts_with("--from=") {
            continue;
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        // Sources are relative to the build context, the repository root.
        for source in &words[..words.len() - 1] {
            assert!(
                workspace().join(source).exists(),
                "COPY {source}: not in the repository"
            );
            copied += 1;
        }
    }
    assert!(copied > 0);
    assert!(dockerfile.contains("cargo build --release --locked -p agent --bin agent"));
    assert!(dockerfile.contains(&format!(
        "COPY --from=build /src/target/release/agent {INSTALLED_BINARY}"
    )));
    assert!(dockerfile.contains(&format!("ENTRYPOINT [\"{INSTALLED_BINARY}\"]")));
    // Every workspace member is copied, or cargo cannot load the workspace.
    for member in ["ruleset", "agent", "integration"] {
        assert!(
            dockerfile.contains(&format!("COPY {member} {member}")),
            "{member}"
        );
    }
}

// ---- the agent's own flags --------------------------------------------------------------------

/// `$NAME` and `${NAME}` replaced from `vars`, as systemd expands ExecStart.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = text.to_owned();
    for (name, value) in vars {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    out
}

fn parse_agent(args: &[String]) -> agent::cli::RunArgs {
    use clap::Parser as _;
    let argv = std::iter::once("agent".to_owned()).chain(args.iter().cloned());
    match agent::cli::Cli::try_parse_from(argv) {
        Ok(agent::cli::Cli {
            command: agent::cli::Command::Run(run),
            ..
        }) => run,
        Ok(_) => panic!("{args:?} is not `agent run`"),
        Err(err) => panic!("the agent refuses {args:?}:\n{err}"),
    }
}

/// The command lines the unit and the DaemonSet give the agent are ones it accepts, with the
/// API as its source and the health endpoint where the probes look.
#[test]
fn the_unit_and_the_daemon_set_pass_flags_the_agent_accepts() {
    let settings = unit_settings(&read_text(&packaging(&format!("systemd/{UNIT}"))));
    let mut vars: BTreeMap<String, String> = setting(&settings, "Environment")
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%H", "node-a")))
        .collect();
    for line in read_text(&packaging("systemd/nftpol-agent.env")).lines() {
        let line = line.trim();
        if let Some((k, v)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            vars.insert(k.to_owned(), v.to_owned());
        }
    }
    let exec = setting(&settings, "ExecStart");
    assert_eq!(exec.len(), 1, "{exec:?}");
    let words: Vec<String> = expand(exec[0], &vars)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(words[0], INSTALLED_BINARY);
    let unit = parse_agent(&words[1..]);
    assert_eq!(unit.manifests, None, "the unit reads the API");
    assert_eq!(unit.node, "node-a");
    assert!(unit.kubeconfig.is_some());
    assert!(unit.health_addr.ip().is_loopback(), "{}", unit.health_addr);

    let objects = objects();
    let pod = objects.daemon_sets[0].spec.template.spec.clone().unwrap();
    let container = pod
        .containers
        .iter()
        .find(|c| c.args.is_some())
        .expect("a container with args");
    for host_ip in ["10.0.0.5", "fd00::5"] {
        let mut args: Vec<String> = container
            .args
            .clone()
            .unwrap()
            .iter()
            .map(|a| a.replace("$(HOST_IP)", host_ip))
            .collect();
        // The DaemonSet gives the node name through NODE_NAME, which clap reads too.
        args.extend(["--node".to_owned(), "node-a".to_owned()]);
        let run = parse_agent(&args);
        assert_eq!(run.manifests, None, "the DaemonSet reads the API");
        assert_eq!(run.health_addr.ip().to_string(), host_ip);
    }
}
