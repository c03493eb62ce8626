//! Secrets shared by the operator and the gateway, derived from one master key.
//!
//! The master key lives in one Secret (by default `cubicle-session-key` in the operator's
//! namespace), created once by the operator with 32 random bytes. From it:
//!
//! - each session's upstream password (Kasm's `VNC_PW`, basic auth user `kasm_user`) is
//!   `HMAC-SHA256(key, "vnc\0" + session uid)`. The operator writes it into a Secret owned by
//!   the Session and injects it as `VNC_PW`; a deleted Secret is restored with the same value,
//!   so the running container's password stays right. The gateway derives it too, so it reads
//!   no per-session Secret at all (its RBAC: `get` on this one Secret).
//! - the gateway's signing key (tickets and cookies), so every gateway replica accepts what
//!   another issued.
//!
//! Nothing here is ever logged: [`MasterKey`] and [`SigningKey`] have no `Debug` output of
//! their bytes.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use ring::hmac;

/// Default name of the master key's Secret.
pub const DEFAULT_KEY_SECRET: &str = "cubicle-session-key";
/// The data key holding the master key in its Secret.
pub const KEY_FIELD: &str = "key";
/// Kasm's basic-auth user name.
pub const KASM_USER: &str = "kasm_user";
/// The data key of a session's password in its Secret.
pub const PASSWORD_FIELD: &str = "password";

/// The master key (32 bytes or more).
#[derive(Clone)]
pub struct MasterKey(Vec<u8>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A key from its bytes; `None` if shorter than 32 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() >= 32).then(|| Self(b.to_vec()))
    }

    /// A fresh random key.
    pub fn random() -> Self {
        let mut b = vec![0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .expect("the system random source works");
        Self(b)
    }

    fn mac(&self, label: &str, data: &[u8]) -> [u8; 32] {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut ctx = hmac::Context::with_key(&k);
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(data);
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// The upstream password of the session with this uid (32 URL-safe characters).
    pub fn session_password(&self, session_uid: &str) -> String {
        let mac = self.mac("vnc", session_uid.as_bytes());
        URL_SAFE_NO_PAD.encode(&mac[..24])
    }

    /// The gateway's signing key.
    pub fn signing_key(&self) -> SigningKey {
        SigningKey(hmac::Key::new(
            hmac::HMAC_SHA256,
            &self.mac("gateway-signing", b""),
        ))
    }
}

/// Signs and verifies the gateway's tickets and cookies.
#[derive(Clone)]
pub struct SigningKey(hmac::Key);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// `payload.signature`, both base64url.
    pub fn seal(&self, payload: &[u8]) -> String {
        let tag = hmac::sign(&self.0, payload);
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    /// The payload of a token [`seal`](Self::seal) made with this key; `None` if forged or
    /// malformed.
    pub fn open(&self, token: &str) -> Option<Vec<u8>> {
        let (p, s) = token.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(p).ok()?;
        let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
        hmac::verify(&self.0, &payload, &sig).ok()?;
        Some(payload)
    }
}

/// The basic-auth header value for a session's upstream.
pub fn basic_auth(password: &str) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{KASM_USER}:{password}"))
    )
}

/// Errors loading the master key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The API call failed.
    #[error("Secret {namespace}/{name}: {source}")]
    Kube {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The Secret has no usable key.
    #[error("Secret {namespace}/{name}: data.{KEY_FIELD} is missing or shorter than 32 bytes")]
    Invalid {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

fn from_secret(s: &Secret, namespace: &str, name: &str) -> Result<MasterKey, KeyError> {
    s.data
        .as_ref()
        .and_then(|d| d.get(KEY_FIELD))
        .and_then(|b| MasterKey::from_bytes(&b.0))
        .ok_or_else(|| KeyError::Invalid {
            namespace: namespace.into(),
            name: name.into(),
        })
}

/// Reads the master key (the gateway: `get` on this one Secret).
pub async fn load(client: Client, namespace: &str, name: &str) -> Result<MasterKey, KeyError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let s = api.get(name).await.map_err(|source| KeyError::Kube {
        namespace: namespace.into(),
        name: name.into(),
        source,
    })?;
    from_secret(&s, namespace, name)
}

/// Reads the master key, creating it first if absent (the operator). Two replicas racing both
/// end up with the one that was created first.
pub async fn ensure(client: Client, namespace: &str, name: &str) -> Result<MasterKey, KeyError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let err = |source| KeyError::Kube {
        namespace: namespace.into(),
        name: name.into(),
        source,
    };
    match api.get_opt(name).await.map_err(err)? {
        Some(s) => from_secret(&s, namespace, name),
        None => {
            let key = MasterKey::random();
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    labels: Some(
                        [(
                            "app.kubernetes.io/managed-by".to_string(),
                            "cubicle".to_string(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                },
                data: Some([(KEY_FIELD.to_string(), ByteString(key.0.clone()))].into()),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => Ok(key),
                Err(kube::Error::Api(s)) if s.code == 409 => load(client, namespace, name).await,
                Err(e) => Err(err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_stable_per_session_and_differ_between_sessions_and_keys() {
        let k = MasterKey::from_bytes(&[7u8; 32]).unwrap();
        let a = k.session_password("uid-a");
        assert_eq!(a, k.session_password("uid-a"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, k.session_password("uid-b"));
        let other = MasterKey::from_bytes(&[8u8; 32]).unwrap();
        assert_ne!(a, other.session_password("uid-a"));
        assert!(MasterKey::from_bytes(&[1u8; 31]).is_none());
        assert_eq!(format!("{k:?}"), "MasterKey(..)");
    }

    #[test]
    fn sealed_tokens_open_only_unchanged_and_with_the_same_key() {
        let k = MasterKey::from_bytes(&[7u8; 32]).unwrap().signing_key();
        let t = k.seal(b"hello");
        assert_eq!(k.open(&t).as_deref(), Some(&b"hello"[..]));
        let other = MasterKey::from_bytes(&[9u8; 32]).unwrap().signing_key();
        assert_eq!(other.open(&t), None);
        let (p, s) = t.split_once('.').unwrap();
        let forged = format!("{}.{s}", URL_SAFE_NO_PAD.encode(b"hellp"));
        assert_eq!(k.open(&forged), None);
        assert_eq!(k.open(p), None);
        assert_eq!(k.open("garbage"), None);
    }

    #[test]
    fn basic_auth_is_kasm_user_and_password() {
        assert_eq!(basic_auth("pw"), "Basic a2FzbV91c2VyOnB3");
    }
}
