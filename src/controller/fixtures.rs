//! Shared test fixtures: the objects the controllers' unit tests build, in one place (namespace
//! `ns` unless given), instead of a builder rewritten in each module.

use serde_json::{Value, json};

use crate::crd::v1alpha1::{Group, GroupSettings, GroupSpec, Session, User};

/// An object of `kind` named `name` in namespace `ns`, with `spec` (and nothing else).
pub fn object<K: serde::de::DeserializeOwned>(kind: &str, name: &str, ns: &str, spec: Value) -> K {
    serde_json::from_value(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
        "spec": spec
    }))
    .unwrap_or_else(|e| panic!("fixture {kind} {name}: {e}"))
}

/// A Session of `user` for `workspace` in `ns`, uid `uid-<name>`.
pub fn session(name: &str, user: &str, workspace: &str) -> Session {
    object(
        "Session",
        name,
        "ns",
        json!({"user": user, "workspace": workspace}),
    )
}

/// A User in the groups named, in `ns`, uid `uid-<name>`; `extra` merged into its spec.
pub fn user(name: &str, groups: &[&str], extra: Value) -> User {
    let mut spec = json!({"groups": groups});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            spec[k] = v;
        }
    }
    object("User", name, "ns", spec)
}

/// A Group with `priority` and `settings`, in `ns`.
pub fn group(name: &str, priority: u32, settings: GroupSettings) -> Group {
    let mut g = Group::new(
        name,
        GroupSpec {
            priority,
            description: None,
            settings,
        },
    );
    g.metadata.namespace = Some("ns".into());
    g
}

/// `v` as the API server gives it back: serialized to JSON and read again.
pub fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    serde_json::from_value(serde_json::to_value(v).expect("serializes")).expect("reads back")
}

/// A later instant than the tests' usual `now` (2026-01-01T00:00:00Z): a recomputation then
/// gives new transition times to conditions computed without a previous status.
pub fn later() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:10:00Z".parse().expect("a timestamp"),
    )
}
