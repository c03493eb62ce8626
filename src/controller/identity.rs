//! Who may act for whom, as RBAC: per User with a `spec.identity`, a Role granting the verb
//! `use` on `users` with `resourceNames: [<user>]`, bound by a RoleBinding to that identity.
//!
//! The admission policy on Sessions (`charts/cubicle/templates/session-policy.yaml`, and
//! [`crate::access`]) asks the API server's authorizer whether the requester may `use` the
//! Session's User, so these two objects are the whole lookup table. They are written by
//! server-side apply with an owner reference to the User (so the garbage collector removes
//! them with it, even while the operator is down) and removed by this controller as soon as
//! the User is deleted or loses its identity. A re-identified User has its binding's subject
//! replaced in the same apply (`subjects` is an atomic list).
//!
//! The same Role lets the identity read and write the User's own preferences
//! (`userpreferences/<user>`, by name): the dashboard writes them as the person.
//!
//! What exists is learned by listing the labelled Roles and RoleBindings of the scope at start
//! and at every resync (a digest of what was applied is kept on the binding), so a steady
//! operator writes nothing, and one that was down catches up on Users deleted or re-identified
//! meanwhile, and on bindings edited by hand.

use crate::controller::error::Verb;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::{StreamExt, stream};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::stores::{MANAGED_BY, MANAGED_BY_LABEL, Reflectors, Scope};
use super::{Context, Error};
use crate::crd::v1alpha1::{User, UserPreferences};

/// Field manager of the Roles and RoleBindings.
pub const MANAGER: &str = "cubicle/identity";
/// The custom verb that says "may act for this User".
pub const USE_VERB: &str = "use";
/// Label on every Role and RoleBinding of this controller (value [`ROLE_VALUE`]).
pub const ROLE_LABEL: &str = "cubicle.dev/role";
/// Its value.
pub const ROLE_VALUE: &str = "use-user";
/// Annotation naming the User a Role or RoleBinding is for.
pub const USER_ANNOTATION: &str = "cubicle.dev/user";
/// Annotation with the digest of what was applied (User uid, name and identity).
pub const DIGEST_ANNOTATION: &str = "cubicle.dev/identity-digest";

/// The version of the Role's rules, part of the digest: a Role written by an operator whose rules
/// differ is applied again once (2: the person's own UserPreferences).
const RULES_VERSION: u32 = 2;
/// What the identity may do to its User's preferences (`userpreferences/<user>`): read and write
/// that one object. `create` with `resourceNames` holds only for a create by name (a server-side
/// apply or an update that creates), which is how the dashboard writes it.
pub const PREFERENCES_VERBS: &[&str] = &["get", "create", "update", "patch"];

/// The longest object name this controller makes (a DNS subdomain's).
const MAX_NAME: usize = 253;

/// The name of the Role and RoleBinding of User `user`: `cubicle-use-<user>`, shortened with
/// a digest when that would be too long.
pub fn object_name(user: &str) -> String {
    let name = format!("cubicle-use-{user}");
    if name.len() <= MAX_NAME {
        return name;
    }
    let d = format!("{:016x}", super::stores::digest(&user));
    let keep = MAX_NAME - d.len() - 1;
    let mut cut = name[..keep].to_string();
    while cut.ends_with(['.', '-']) {
        cut.pop();
    }
    format!("{cut}-{d}")
}

/// The digest of what the Role and RoleBinding of `user` say, kept on the binding.
pub fn applied_digest(user: &User) -> Option<String> {
    let id = user.spec.identity.as_ref()?;
    if id.username.is_empty() {
        return None;
    }
    let uid = user.metadata.uid.as_deref().unwrap_or("");
    Some(format!(
        "{:016x}",
        super::stores::digest(&(uid, user.name_any(), &id.username, RULES_VERSION))
    ))
}

fn meta(user: &User, digest: &str) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        name: Some(object_name(&user.name_any())),
        namespace: Some(user.namespace()?),
        labels: Some(BTreeMap::from([
            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
            (ROLE_LABEL.to_string(), ROLE_VALUE.to_string()),
        ])),
        annotations: Some(BTreeMap::from([
            (USER_ANNOTATION.to_string(), user.name_any()),
            (DIGEST_ANNOTATION.to_string(), digest.to_string()),
        ])),
        owner_references: Some(vec![user.controller_owner_ref(&())?]),
        ..ObjectMeta::default()
    })
}

/// The Role and RoleBinding `user` should have (pure): none without an identity (or without
/// the uid and namespace every stored User has).
pub fn desired(user: &User) -> Option<(Role, RoleBinding)> {
    let digest = applied_digest(user)?;
    let id = user.spec.identity.as_ref()?;
    let meta = meta(user, &digest)?;
    let name = object_name(&user.name_any());
    let role = Role {
        metadata: meta.clone(),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec![User::group(&()).to_string()]),
                resources: Some(vec![User::plural(&()).to_string()]),
                resource_names: Some(vec![user.name_any()]),
                verbs: vec![USE_VERB.to_string()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec![UserPreferences::group(&()).to_string()]),
                resources: Some(vec![UserPreferences::plural(&()).to_string()]),
                resource_names: Some(vec![user.name_any()]),
                verbs: PREFERENCES_VERBS.iter().map(|v| v.to_string()).collect(),
                ..PolicyRule::default()
            },
        ]),
    };
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name,
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: id.username.clone(),
            namespace: None,
        }]),
    };
    Some((role, binding))
}

/// What to do for one User (pure): `applied` is the digest on its binding now (none: no
/// binding known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Apply the Role and RoleBinding.
    Apply,
    /// Delete them.
    Remove,
    /// Nothing.
    Keep,
}

/// Decides what to do for a User (`user`: it as cached, none when it is gone).
pub fn step(user: Option<&User>, applied: Option<&str>) -> Step {
    let want = user.and_then(applied_digest);
    match (want, applied) {
        (Some(w), Some(a)) if w == a => Step::Keep,
        (Some(_), _) => Step::Apply,
        (None, Some(_)) => Step::Remove,
        (None, None) => Step::Keep,
    }
}

type Key = (String, String);

fn key_of(u: &User) -> Option<Key> {
    Some((u.namespace()?, u.name_any()))
}

struct Runner {
    ctx: Arc<Context>,
    scope: Scope,
    users: kube::runtime::reflector::Store<User>,
    /// (namespace, user) → the digest on its binding ("" when only the Role was seen).
    applied: HashMap<Key, String>,
    retry: mpsc::UnboundedSender<Key>,
}

impl Runner {
    fn roles(&self, ns: &str) -> Api<Role> {
        Api::namespaced(self.ctx.client.clone(), ns)
    }

    fn bindings(&self, ns: &str) -> Api<RoleBinding> {
        Api::namespaced(self.ctx.client.clone(), ns)
    }

    /// Learns what exists (every labelled Role and RoleBinding in scope) and reconciles every
    /// User and every leftover. Errors of the listing leave the earlier knowledge in place.
    async fn resync(&mut self) {
        let lp = ListParams::default().labels(&format!("{ROLE_LABEL}={ROLE_VALUE}"));
        let (roles, bindings): (Api<Role>, Api<RoleBinding>) = match &self.scope {
            Scope::All => (
                Api::all(self.ctx.client.clone()),
                Api::all(self.ctx.client.clone()),
            ),
            Scope::Namespace(ns) => (self.roles(ns), self.bindings(ns)),
        };
        let (roles, bindings) = match (roles.list(&lp).await, bindings.list(&lp).await) {
            (Ok(r), Ok(b)) => (r, b),
            (Err(e), _) | (_, Err(e)) => {
                warn!(error = %e, "listing the identity Roles and RoleBindings failed");
                return;
            }
        };
        let mut applied = HashMap::new();
        let user_of = |m: &ObjectMeta| -> Option<Key> {
            Some((
                m.namespace.clone()?,
                m.annotations.as_ref()?.get(USER_ANNOTATION)?.clone(),
            ))
        };
        for r in &roles.items {
            if let Some(k) = user_of(&r.metadata) {
                applied.insert(k, String::new());
            }
        }
        for b in &bindings.items {
            if let Some(k) = user_of(&b.metadata) {
                let d = b
                    .annotations()
                    .get(DIGEST_ANNOTATION)
                    .cloned()
                    .unwrap_or_default();
                // A binding without its Role (or edited by hand) is re-applied.
                let role_ok = roles
                    .items
                    .iter()
                    .any(|r| user_of(&r.metadata) == Some(k.clone()));
                let hand_edited = desired_subject_differs(b);
                applied.insert(
                    k,
                    if role_ok && !hand_edited {
                        d
                    } else {
                        String::new()
                    },
                );
            }
        }
        self.applied = applied;
        let mut keys: BTreeSet<Key> = self.applied.keys().cloned().collect();
        keys.extend(self.users.state().iter().filter_map(|u| key_of(u)));
        for k in keys {
            self.reconcile(k).await;
        }
    }

    async fn reconcile(&mut self, key: Key) {
        let (ns, name) = &key;
        let user = self
            .users
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(ns));
        let applied = self.applied.get(&key).map(String::as_str);
        let result = match step(user.as_deref(), applied) {
            Step::Keep => return,
            Step::Apply => self.apply(user.as_deref().expect("Apply has a user")).await,
            Step::Remove => self.remove(ns, name).await,
        };
        let id = format!("User {ns}/{name}");
        // Backoff under the grant's Role, apart from the User status controller's key.
        let grant = kube::runtime::reflector::ObjectRef::<k8s_openapi::api::rbac::v1::Role>::new(
            &object_name(name),
        )
        .within(ns);
        match result {
            Ok(Some(d)) => {
                self.ctx.backoff.succeeded(&grant);
                self.applied.insert(key, d);
            }
            Ok(None) => {
                self.ctx.backoff.succeeded(&grant);
                self.applied.remove(&key);
            }
            Err(e) => {
                self.ctx.metrics.error("UserAccess", e.category().as_str());
                let wait = self.ctx.backoff.failed(&grant);
                warn!(user = %id, error = %super::error::chain(&e), retry_in = ?wait, "identity RBAC not in step");
                let tx = self.retry.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = tx.unbounded_send(key);
                });
            }
        }
    }

    /// Applies the Role, then the RoleBinding; returns the digest now applied.
    async fn apply(&self, user: &User) -> Result<Option<String>, Error> {
        let Some((role, binding)) = desired(user) else {
            return Ok(None);
        };
        let ns = user.namespace().unwrap_or_default();
        let name = object_name(&user.name_any());
        let pp = PatchParams::apply(MANAGER).force();
        self.roles(&ns)
            .patch(&name, &pp, &Patch::Apply(&role))
            .await
            .map_err(|source| Error::Child {
                verb: Verb::Apply,
                kind: "Role",
                name: name.clone(),
                source,
            })?;
        self.bindings(&ns)
            .patch(&name, &pp, &Patch::Apply(&binding))
            .await
            .map_err(|source| Error::Child {
                verb: Verb::Apply,
                kind: "RoleBinding",
                name: name.clone(),
                source,
            })?;
        info!(user = %user.name_any(), namespace = %ns, identity = %binding.subjects.as_ref().map(|s| s[0].name.as_str()).unwrap_or(""), "identity may act for the user");
        Ok(applied_digest(user))
    }

    /// Deletes the RoleBinding (first: it is what grants), then the Role.
    async fn remove(&self, ns: &str, user: &str) -> Result<Option<String>, Error> {
        let name = object_name(user);
        let dp = DeleteParams::background();
        match self.bindings(ns).delete(&name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::Child {
                    verb: Verb::Delete,
                    kind: "RoleBinding",
                    name,
                    source,
                });
            }
        }
        match self.roles(ns).delete(&name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::Child {
                    verb: Verb::Delete,
                    kind: "Role",
                    name,
                    source,
                });
            }
        }
        info!(
            user,
            namespace = ns,
            "no identity may act for the user any more"
        );
        Ok(None)
    }
}

/// Whether a binding's subjects are not exactly one User (someone edited it): it is re-applied.
fn desired_subject_differs(b: &RoleBinding) -> bool {
    !matches!(b.subjects.as_deref(), Some([s]) if s.kind == "User" && s.namespace.is_none())
}

/// Builds the identity controller over the shared User cache.
pub fn controller(r: &mut Reflectors, ctx: Arc<Context>) -> BoxFuture<'static, ()> {
    let changes = r.users.subscribe();
    let deletes = r.users.subscribe_deletes();
    let users = r.users.reader.clone();
    let scope = r.scope().clone();
    Box::pin(async move {
        ctx.wait_synced().await;
        let (retry, retries) = mpsc::unbounded();
        let every = ctx.config.resync;
        let mut runner = Runner {
            ctx,
            scope,
            users,
            applied: HashMap::new(),
            retry,
        };
        runner.resync().await;
        enum Trigger {
            User(Key),
            Resync,
        }
        let ticks = if every.is_zero() {
            stream::pending().boxed()
        } else {
            tokio_stream_interval(every)
                .map(|_| Trigger::Resync)
                .boxed()
        };
        let mut triggers = stream::select_all([
            changes
                .filter_map(|u| async move { key_of(&u) })
                .map(Trigger::User)
                .boxed(),
            deletes
                .filter_map(|u| async move { key_of(&u) })
                .map(Trigger::User)
                .boxed(),
            retries.map(Trigger::User).boxed(),
            ticks,
        ]);
        while let Some(t) = triggers.next().await {
            match t {
                Trigger::User(k) => runner.reconcile(k).await,
                Trigger::Resync => runner.resync().await,
            }
        }
    })
}

/// A tick every `every`, the first after one interval.
fn tokio_stream_interval(every: Duration) -> impl futures::Stream<Item = ()> {
    stream::unfold((), move |()| async move {
        tokio::time::sleep(every).await;
        Some(((), ()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, identity: Option<&str>) -> User {
        let extra = match identity {
            Some(i) => serde_json::json!({"identity": {"username": i}}),
            None => serde_json::json!({}),
        };
        let mut u = crate::controller::fixtures::user(name, &[], extra);
        u.metadata.namespace = Some("team".into());
        u
    }

    #[test]
    fn a_user_with_an_identity_gets_use_on_itself_only_bound_to_that_identity() {
        let u = user("alice", Some("oidc:alice@example.com"));
        let (role, binding) = desired(&u).unwrap();
        assert_eq!(role.metadata.name.as_deref(), Some("cubicle-use-alice"));
        assert_eq!(role.metadata.namespace.as_deref(), Some("team"));
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].verbs, vec!["use"]);
        // And its own preferences, by name only (never another User's, never delete or list).
        assert_eq!(
            rules[1].resources.as_deref(),
            Some(&["userpreferences".to_string()][..])
        );
        assert_eq!(
            rules[1].resource_names.as_deref(),
            Some(&["alice".to_string()][..])
        );
        assert_eq!(rules[1].verbs, vec!["get", "create", "update", "patch"]);
        assert_eq!(
            rules[0].api_groups.as_deref(),
            Some(&["cubicle.dev".to_string()][..])
        );
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["users".to_string()][..])
        );
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&["alice".to_string()][..])
        );
        let subjects = binding.subjects.unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].kind, "User");
        assert_eq!(subjects[0].name, "oidc:alice@example.com");
        assert_eq!(binding.role_ref.name, "cubicle-use-alice");
        let owner = &role.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("User", "uid-alice")
        );
    }

    #[test]
    fn no_identity_no_grant() {
        assert!(desired(&user("bob", None)).is_none());
        assert!(desired(&user("bob", Some(""))).is_none());
    }

    #[test]
    fn steps_follow_the_identity() {
        let u = user("alice", Some("alice"));
        let d = applied_digest(&u).unwrap();
        assert_eq!(step(Some(&u), Some(&d)), Step::Keep);
        assert_eq!(step(Some(&u), None), Step::Apply);
        assert_eq!(step(Some(&u), Some("")), Step::Apply);
        // Re-identified: the digest differs.
        let v = user("alice", Some("bob"));
        assert_eq!(step(Some(&v), Some(&d)), Step::Apply);
        // Identity removed, or the User deleted: the grant goes.
        assert_eq!(step(Some(&user("alice", None)), Some(&d)), Step::Remove);
        assert_eq!(step(None, Some(&d)), Step::Remove);
        assert_eq!(step(None, None), Step::Keep);
        assert_eq!(step(Some(&user("alice", None)), None), Step::Keep);
    }

    #[test]
    fn a_recreated_user_is_applied_again_for_its_new_uid() {
        let a = user("alice", Some("alice"));
        let mut b = a.clone();
        b.metadata.uid = Some("another".into());
        assert_ne!(applied_digest(&a), applied_digest(&b));
    }

    #[test]
    fn long_names_are_shortened_with_a_digest() {
        let long = "a".repeat(253);
        let n = object_name(&long);
        assert!(n.len() <= 253, "{}", n.len());
        assert!(n.starts_with("cubicle-use-aaa"));
        assert_ne!(n, object_name(&"a".repeat(252)));
        assert_eq!(object_name("alice"), "cubicle-use-alice");
    }
}
