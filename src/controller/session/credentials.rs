//! A session's upstream credentials: the password of its desktop (Kasm's `VNC_PW`, basic auth
//! user `kasm_user`), in a Secret owned by the Session and injected into the session container.
//!
//! The password is derived from the operator's master key and the session's uid
//! ([`crate::credentials`]), so a deleted Secret is restored with the same value: the running
//! container keeps working, and the gateway (which derives it too) never reads the Secret. The
//! password is never logged, nor written to status or events.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    ContainerPort, EnvVar, EnvVarSource, Pod, Secret, SecretKeySelector,
};
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::controller::contract::{SESSION_LABEL, label_value};
use crate::controller::stores::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::crd::v1alpha1::{Session, Workspace};
use crate::credentials::{MasterKey, PASSWORD_FIELD};

/// The environment variable Kasm images read their desktop password from.
pub const VNC_PW: &str = "VNC_PW";
/// The name of the session container's desktop port.
pub const DESKTOP_PORT_NAME: &str = "desktop";

/// The Secret's name: `<session>-vnc` (cut to fit, the Secret name limit being 253).
pub fn secret_name(session: &Session) -> String {
    let mut n = session.name_any();
    n.truncate(249);
    format!("{}-vnc", n.trim_end_matches(['-', '.']))
}

/// The session's credentials Secret.
pub fn secret(session: &Session, key: &MasterKey) -> Secret {
    let uid = session.meta().uid.clone().unwrap_or_default();
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(session)),
            namespace: session.namespace(),
            labels: Some(
                [
                    (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                    (SESSION_LABEL.to_string(), label_value(&session.name_any())),
                ]
                .into(),
            ),
            owner_references: session.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(
            [(
                PASSWORD_FIELD.to_string(),
                ByteString(key.session_password(&uid).into_bytes()),
            )]
            .into(),
        ),
        type_: Some("Opaque".into()),
        immutable: Some(true),
        ..Default::default()
    }
}

/// Adds `VNC_PW` (from the Secret) and the named desktop port to the session container.
pub fn inject(pod: &mut Pod, session: &Session, workspace: &Workspace) {
    let (port, _, _) = workspace.spec.desktop();
    let Some(c) = pod
        .spec
        .as_mut()
        .and_then(|s| s.containers.iter_mut().find(|c| c.name == "session"))
    else {
        return;
    };
    let env = c.env.get_or_insert_with(Vec::new);
    env.retain(|e| e.name != VNC_PW);
    env.push(EnvVar {
        name: VNC_PW.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret_name(session),
                key: PASSWORD_FIELD.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    });
    let ports = c.ports.get_or_insert_with(Vec::new);
    if !ports.iter().any(|p| p.container_port == i32::from(port)) {
        ports.push(ContainerPort {
            name: Some(DESKTOP_PORT_NAME.into()),
            container_port: i32::from(port),
            protocol: Some("TCP".into()),
            ..Default::default()
        });
    }
}

/// Whether a pod's reported problem is the missing Secret (the container cannot start without
/// it: the kubelet says `secret "<name>" not found`).
pub fn missing(problem: Option<&str>, session: &Session) -> bool {
    problem.is_some_and(|p| p.contains(&format!("\"{}\"", secret_name(session))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        crate::controller::fixtures::session("desk", "alice", "w")
    }

    #[test]
    fn the_secret_is_owned_by_the_session_and_holds_the_derived_password() {
        let key = MasterKey::from_bytes(&[3u8; 32]).unwrap();
        let s = secret(&session(), &key);
        assert_eq!(s.metadata.name.as_deref(), Some("desk-vnc"));
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Session", "uid-desk")
        );
        assert_eq!(owner.controller, Some(true));
        let pw = &s.data.as_ref().unwrap()[PASSWORD_FIELD];
        assert_eq!(pw.0, key.session_password("uid-desk").into_bytes());
        // The same Secret again after a deletion: the same password.
        assert_eq!(secret(&session(), &key), s);
    }

    #[test]
    fn only_a_problem_naming_the_secret_restores_it() {
        let s = session();
        assert!(missing(
            Some("CreateContainerConfigError: secret \"desk-vnc\" not found"),
            &s
        ));
        assert!(!missing(Some("ImagePullBackOff: x"), &s));
        assert!(!missing(None, &s));
    }

    #[test]
    fn the_container_gets_vnc_pw_from_the_secret_and_a_named_port() {
        let ws: Workspace = serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace",
            "metadata": {"name": "w"},
            "spec": {"image": "x", "connection": {"port": 8443}},
        }))
        .unwrap();
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "session", "env": [{"name": "VNC_PW", "value": "guess"}]}]}
        }))
        .unwrap();
        inject(&mut pod, &session(), &ws);
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let env = c.env.as_ref().unwrap();
        assert_eq!(env.len(), 1, "a workspace's own VNC_PW is replaced");
        assert!(env[0].value.is_none());
        let r = env[0]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (r.name.as_str(), r.key.as_str()),
            ("desk-vnc", PASSWORD_FIELD)
        );
        let p = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (p.name.as_deref(), p.container_port),
            (Some("desktop"), 8443)
        );
    }
}
