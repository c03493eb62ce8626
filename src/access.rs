//! Who may act for which User: the admission policy on Sessions, and how a refusal reads.
//!
//! A Session is created, changed or deleted only by a requester the API server's authorizer
//! allows to `use` the Session's User (`cubicle.dev` `users/<spec.user>`). The grants are RBAC:
//! the operator binds each User's `spec.identity` ([`crate::controller::identity`]), the chart
//! binds the admin groups to every User. The check runs in the API server as a
//! ValidatingAdmissionPolicy (no webhook to run, no window where it is off); it does not match
//! `sessions/status`, so the operator's status writes pass. The chart ships the same policy
//! (`charts/cubicle/templates/session-policy.yaml`); `cubicle dev up --demo` and the test
//! harness install this copy under [`DEV_POLICY`].

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

/// The name of the policy and its binding installed by `cubicle dev` and the test harness (the
/// chart's are named after the release, so both can coexist).
pub const DEV_POLICY: &str = "cubicle-dev-session-user";

/// The CEL variable naming the User a request acts for: the new object's, or on DELETE the
/// old one's.
pub const TARGET_EXPRESSION: &str =
    "request.operation == 'DELETE' ? oldObject.spec.user : object.spec.user";

/// The check: may the requester `use` that User in the request's namespace?
pub const CHECK_EXPRESSION: &str = "authorizer.group('cubicle.dev').resource('users')\
.namespace(request.namespace).name(variables.target).check('use').allowed()";

/// The refusal: the requester, the User and the rule.
pub const MESSAGE_EXPRESSION: &str = "request.userInfo.username + ' may not act for User ' + \
variables.target + ' (a Session is created, changed or deleted only by someone who may use \
its User: cubicle.dev users/' + variables.target + ', verb use)'";

/// The policy (cluster-scoped), named `name`.
pub fn policy(name: &str) -> ValidatingAdmissionPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "cubicle"}},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["cubicle.dev"],
                "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE", "DELETE"],
                "resources": ["sessions"],
            }]},
            "variables": [{"name": "target", "expression": TARGET_EXPRESSION}],
            "validations": [{
                "expression": CHECK_EXPRESSION,
                "reason": "Forbidden",
                "messageExpression": MESSAGE_EXPRESSION,
            }],
        }
    }))
    .expect("a well-formed policy")
}

/// Its binding: deny, in every namespace.
pub fn binding(name: &str) -> ValidatingAdmissionPolicyBinding {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "cubicle"}},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }))
    .expect("a well-formed binding")
}

/// The end-user ClusterRole of `cubicle dev` and the tests (the chart's is `<release>-user`).
pub const DEV_USER_ROLE: &str = "cubicle-dev-user";
/// The ClusterRole (and binding) of `cubicle dev`'s admin groups.
pub const DEV_ADMIN_ROLE: &str = "cubicle-dev-act-for-every-user";

/// The end-user role: Sessions CRUD, read the namespace's Users, Groups and Workspaces;
/// nothing on pods, `pods/exec`, `pods/portforward`, claims or Secrets (the chart's
/// `templates/access-rbac.yaml` has the same rules; tests/chart.rs compares them).
pub fn user_role(name: &str) -> ClusterRole {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"cubicle.dev/for": "people"}},
        "rules": [
            {"apiGroups": ["cubicle.dev"], "resources": ["sessions"],
             "verbs": ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]},
            {"apiGroups": ["cubicle.dev"], "resources": ["users", "groups", "workspaces"],
             "verbs": ["get", "list", "watch"]},
        ]
    }))
    .expect("a well-formed role")
}

/// `use` on every User, for the admin groups.
pub fn admin_role(name: &str) -> ClusterRole {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"cubicle.dev/for": "people"}},
        "rules": [{"apiGroups": ["cubicle.dev"], "resources": ["users"], "verbs": ["use"]}]
    }))
    .expect("a well-formed role")
}

/// Binds the ClusterRole `name` to `groups`.
pub fn admin_binding(name: &str, groups: &[&str]) -> ClusterRoleBinding {
    let subjects: Vec<serde_json::Value> = groups
        .iter()
        .map(|g| serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": {"cubicle.dev/for": "people"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": subjects,
    }))
    .expect("a well-formed binding")
}

/// Installs (server-side apply) the policy and its binding named [`DEV_POLICY`], the end-user
/// role [`DEV_USER_ROLE`] bound in every namespace to `people_groups` (a local cluster's
/// convenience; on a real cluster bind it per namespace), and `use` on every User for
/// `admin_groups` ([`DEV_ADMIN_ROLE`]).
pub async fn install(
    client: &Client,
    admin_groups: &[&str],
    people_groups: &[&str],
) -> Result<(), kube::Error> {
    let pp = PatchParams::apply("cubicle-dev").force();
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .patch(DEV_POLICY, &pp, &Patch::Apply(&policy(DEV_POLICY)))
        .await?;
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .patch(DEV_POLICY, &pp, &Patch::Apply(&binding(DEV_POLICY)))
        .await?;
    let roles = Api::<ClusterRole>::all(client.clone());
    roles
        .patch(DEV_USER_ROLE, &pp, &Patch::Apply(&user_role(DEV_USER_ROLE)))
        .await?;
    roles
        .patch(
            DEV_ADMIN_ROLE,
            &pp,
            &Patch::Apply(&admin_role(DEV_ADMIN_ROLE)),
        )
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            DEV_ADMIN_ROLE,
            &pp,
            &Patch::Apply(&admin_binding(DEV_ADMIN_ROLE, admin_groups)),
        )
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            DEV_USER_ROLE,
            &pp,
            &Patch::Apply(&admin_binding(DEV_USER_ROLE, people_groups)),
        )
        .await?;
    Ok(())
}

/// Whether the policy named `name` is in effect: its type checks are done (the API server
/// reports `status.typeChecking` once it has compiled the expressions against the Session
/// schema) and none failed. A freshly applied policy can take a moment.
pub async fn in_effect(client: &Client, name: &str) -> Result<bool, kube::Error> {
    let p = Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .get(name)
        .await?;
    let gen_seen = p
        .status
        .as_ref()
        .and_then(|s| s.observed_generation)
        .is_some_and(|g| Some(g) == p.metadata.generation);
    let clean = p
        .status
        .as_ref()
        .and_then(|s| s.type_checking.as_ref())
        .is_none_or(|t| t.expression_warnings.as_ref().is_none_or(|w| w.is_empty()));
    Ok(gen_seen && clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_matches_session_writes_but_not_status() {
        let p = policy("x");
        let spec = p.spec.unwrap();
        let rules = spec.match_constraints.unwrap().resource_rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["sessions".to_string()][..])
        );
        assert_eq!(
            rules[0].operations.as_deref(),
            Some(&["CREATE".to_string(), "UPDATE".into(), "DELETE".into()][..])
        );
        assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
        let v = &spec.validations.unwrap()[0];
        assert!(v.expression.contains(".check('use').allowed()"));
        assert_eq!(binding("x").spec.unwrap().policy_name.as_deref(), Some("x"));
    }

    /// The chart ships the same expressions (tests/chart.rs checks the rendered policy too).
    #[test]
    fn the_chart_template_carries_the_same_expressions() {
        let t = include_str!("../charts/cubicle/templates/session-policy.yaml");
        let squash = |s: &str| s.split_whitespace().collect::<String>();
        let t = squash(t);
        for e in [TARGET_EXPRESSION, CHECK_EXPRESSION, MESSAGE_EXPRESSION] {
            assert!(t.contains(&squash(e)), "the chart lacks {e}");
        }
    }
}
