//! Cluster snapshots from files: a file or a directory of YAML or JSON, each file holding single
//! objects, several `---` documents, or `kind: List` (what `kubectl get -o yaml` prints).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use ruleset::Cluster;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::convert;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: malformed YAML: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(transparent)]
    Object(Box<ObjectError>),
}

/// An object that is valid YAML but not a valid instance of its kind.
#[derive(Debug, thiserror::Error)]
#[error("{}: document {document}: {kind} {name}: field {field}: {message}", path.display())]
pub struct ObjectError {
    pub path: PathBuf,
    pub document: usize,
    pub kind: String,
    pub name: String,
    pub field: String,
    pub message: String,
}

/// Every Namespace, Pod and NetworkPolicy under `path`, as one cluster index.
pub fn load(path: &Path) -> Result<Cluster, ManifestError> {
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    let mut objects = Objects::default();
    for file in files {
        let text = fs::read_to_string(&file).map_err(|source| ManifestError::Read {
            path: file.clone(),
            source,
        })?;
        parse_file(&file, &text, &mut objects)?;
    }
    Ok(Cluster::from_objects(
        objects.namespaces,
        objects.pods,
        objects.policies,
    ))
}

/// What a snapshot's files look like to the file system: each file's resolved path, inode,
/// size and modification time. It changes when a file is written in place, replaced by a
/// rename, or swapped through a symlink (the `..data` link of a ConfigMap volume).
pub type Fingerprint = Vec<(PathBuf, u64, u64, Option<std::time::SystemTime>)>;

pub fn fingerprint(path: &Path) -> Result<Fingerprint, ManifestError> {
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    files
        .into_iter()
        .map(|file| {
            let read_err = |source| ManifestError::Read {
                path: file.clone(),
                source,
            };
            let meta = fs::metadata(&file).map_err(read_err)?;
            let resolved = fs::canonicalize(&file).map_err(read_err)?;
            Ok((resolved, meta.ino(), meta.len(), meta.modified().ok()))
        })
        .collect()
}

#[derive(Default)]
struct Objects {
    namespaces: Vec<ruleset::model::Namespace>,
    pods: Vec<ruleset::model::Pod>,
    policies: Vec<ruleset::model::NetworkPolicy>,
}

/// Files in name order; hidden entries (editor swap files, the `..data` links of ConfigMap
/// volumes) are skipped, their targets being reached through the visible names.
fn collect_files(path: &Path, files: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    };
    if !fs::metadata(path).map_err(read_err)?.is_dir() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(path)
        .map_err(read_err)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.'))
        })
        .collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect_files(&entry, files)?;
        } else if matches!(
            entry.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            files.push(entry);
        }
    }
    Ok(())
}

fn parse_file(path: &Path, text: &str, objects: &mut Objects) -> Result<(), ManifestError> {
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document).map_err(|e| {
            let location = e.location();
            ManifestError::Syntax {
                path: path.to_path_buf(),
                line: location.as_ref().map_or(0, |l| l.line()),
                column: location.as_ref().map_or(0, |l| l.column()),
                message: e.to_string(),
            }
        })?;
        add_object(path, index + 1, value, objects)?;
    }
    Ok(())
}

fn add_object(
    path: &Path,
    document: usize,
    value: Value,
    objects: &mut Objects,
) -> Result<(), ManifestError> {
    if value.is_null() {
        return Ok(());
    }
    let text = |key: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    let typed = |what: &str| ObjectContext {
        path,
        document,
        kind: what.to_string(),
        name: object_name(&value),
    };
    match (api_version.as_str(), kind.as_str()) {
        (_, k) if k.ends_with("List") => {
            let items = match value.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                _ => Vec::new(),
            };
            for item in items {
                add_object(path, document, item, objects)?;
            }
        }
        ("v1", "Namespace") => {
            let ns: core::Namespace = typed("namespace").decode(value)?;
            objects.namespaces.push(convert::namespace(ns));
        }
        ("v1", "Pod") => {
            let pod: core::Pod = typed("pod").decode(value)?;
            objects.pods.push(convert::pod(pod));
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let policy: net::NetworkPolicy = typed("networkpolicy").decode(value)?;
            objects.policies.push(convert::network_policy(policy));
        }
        _ => {
            tracing::debug!(file = %path.display(), document, %api_version, %kind, "skipping object of another kind")
        }
    }
    Ok(())
}

struct ObjectContext<'a> {
    path: &'a Path,
    document: usize,
    kind: String,
    name: String,
}

impl ObjectContext<'_> {
    /// Deserializes into the API type, naming the offending field on failure. An object without
    /// a name is refused too: the API server holds none, and a policy without one could not be
    /// named in a diagnostic, an Event or a trace.
    fn decode<T: DeserializeOwned>(self, value: Value) -> Result<T, ManifestError> {
        // Metadata of the wrong type is left to the decoder, which names that.
        let unnamed = match value.get("metadata") {
            None | Some(Value::Null) => true,
            Some(Value::Mapping(meta)) => meta
                .get("name")
                .is_none_or(|n| n.is_null() || n.as_str() == Some("")),
            Some(_) => false,
        };
        if unnamed {
            return Err(self.error("metadata.name".into(), "missing or empty".into()));
        }
        serde_path_to_error::deserialize(value)
            .map_err(|e| self.error(e.path().to_string(), e.into_inner().to_string()))
    }

    fn error(&self, field: String, message: String) -> ManifestError {
        ManifestError::Object(Box::new(ObjectError {
            path: self.path.to_path_buf(),
            document: self.document,
            kind: self.kind.clone(),
            name: self.name.clone(),
            field,
            message,
        }))
    }
}

fn object_name(value: &Value) -> String {
    let meta = |key: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let name = meta("name")
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "(unnamed)".into());
    let kind = value.get("kind").and_then(Value::as_str);
    if kind == Some("Namespace") {
        return name;
    }
    format!(
        "{}/{name}",
        convert::namespace_of(meta("namespace").as_deref())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Objects, ManifestError> {
        let mut objects = Objects::default();
        parse_file(Path::new("snap.yaml"), text, &mut objects)?;
        Ok(objects)
    }

    #[test]
    fn multi_document_and_list_and_other_kinds() {
        let objects = parse(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {namespace: prod, name: db-0, labels: {app: db}}
  spec:
    nodeName: node-a
    containers:
    - name: db
      image: postgres
      ports: [{containerPort: 5432, name: pg}]
  status: {phase: Running, podIPs: [{ip: 10.244.1.5}, {ip: "fd00::5"}]}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: ignored}
---
{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
 "metadata": {"namespace": "prod", "name": "deny"},
 "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": "pg"}]}]}}
"#,
        )
        .unwrap();
        assert_eq!(objects.namespaces.len(), 1);
        assert_eq!(objects.pods.len(), 1);
        let pod = &objects.pods[0];
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.node.as_deref(), Some("node-a"));
        assert_eq!(pod.named_port("pg", "TCP"), Some(5432));
        assert_eq!(objects.policies.len(), 1);
        assert_eq!(
            objects.policies[0].ingress[0].ports[0].port,
            Some(ruleset::model::PortRef::Name("pg".into()))
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = parse("apiVersion: v1\nkind: Pod\nmetadata: [unclosed\n")
            .err()
            .unwrap();
        match err {
            ManifestError::Syntax { line, .. } => assert!(line >= 3, "line {line}"),
            other => panic!("wrong error: {other}"),
        }
    }

    #[test]
    fn type_error_names_the_object_and_field() {
        let err = parse(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: a, name: p}\nspec: {podSelector: {}, ingress: [{ports: [{port: [1]}]}]}\n",
        )
        .err()
        .unwrap();
        let text = err.to_string();
        assert!(text.contains("networkpolicy a/p"), "{text}");
        assert!(text.contains("spec.ingress[0].ports[0].port"), "{text}");
    }

    #[test]
    fn an_object_without_a_name_is_refused_and_an_empty_namespace_is_the_default() {
        for metadata in [
            "{namespace: a}",
            "{namespace: a, name: ''}",
            "{name: null}",
            "null",
        ] {
            let err = parse(&format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {metadata}\nspec: {{podSelector: {{}}}}\n"
            ))
            .err()
            .unwrap_or_else(|| panic!("metadata {metadata} accepted"));
            let text = err.to_string();
            assert!(text.contains("networkpolicy"), "{text}");
            assert!(
                text.contains("field metadata.name: missing or empty"),
                "{text}"
            );
        }
        for kind in ["Namespace", "Pod"] {
            let err = parse(&format!(
                "apiVersion: v1\nkind: {kind}\nmetadata: {{labels: {{a: b}}}}\n"
            ))
            .err()
            .unwrap_or_else(|| panic!("{kind} without a name accepted"));
            assert!(err.to_string().contains("metadata.name"), "{err}");
        }
        let objects = parse(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: '', name: p}\nspec: {podSelector: {}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {namespace: '', name: q}\n",
        )
        .unwrap();
        assert_eq!(objects.policies[0].namespace, "default");
        assert_eq!(objects.pods[0].namespace, "default");
    }

    #[test]
    fn directory_skips_hidden_entries_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n";
        fs::write(dir.path().join("a.yaml"), ns).unwrap();
        fs::write(dir.path().join(".a.yaml.swp"), "not yaml: [").unwrap();
        fs::write(dir.path().join("README"), "not yaml: [").unwrap();
        let cluster = load(dir.path()).unwrap();
        assert_eq!(cluster.namespace_names().collect::<Vec<_>>(), ["x"]);
    }
}
