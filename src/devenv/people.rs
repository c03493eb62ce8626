//! Demo people on the local control plane: static-token identities, one kubeconfig each.
//!
//! The control plane authenticates its admin and these people by static bearer tokens
//! (`--token-auth-file`; `controlplane up --extra-tokens`). Tokens are random per directory
//! and written only there (mode 0600). The identities are those the example Users carry
//! (`examples/users/*.yaml`, `spec.identity`), plus a person with no User and an admin-group
//! member, so the quickstart and the tests can act as each.

use std::path::{Path, PathBuf};

use super::DevError;

/// The group every demo person is in (the quickstart binds the end-user role to it).
pub const PEOPLE_GROUP: &str = "cubicle-people";
/// The admin group of the quickstart: its members may act for every User.
pub const ADMIN_GROUP: &str = "cubicle-admins";

/// One demo person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// Short name (file names, the quickstart's list).
    pub short: &'static str,
    /// The username the API server reports.
    pub username: &'static str,
    /// The uid it reports.
    pub uid: &'static str,
    /// Groups besides [`PEOPLE_GROUP`].
    pub groups: &'static [&'static str],
}

/// The demo people.
pub const PEOPLE: &[Person] = &[
    Person {
        short: "alice",
        username: "alice@northwind.example",
        uid: "northwind-1001",
        groups: &[],
    },
    Person {
        short: "bob",
        username: "bob.martin@northwind.example",
        uid: "northwind-1002",
        groups: &[],
    },
    Person {
        short: "carol",
        username: "carol@partner.example",
        uid: "partner-8812",
        groups: &[],
    },
    Person {
        short: "dave",
        username: "dave@northwind.example",
        uid: "northwind-1004",
        groups: &[],
    },
    Person {
        short: "erin",
        username: "erin@northwind.example",
        uid: "northwind-1005",
        groups: &[],
    },
    // No User carries this identity.
    Person {
        short: "mallory",
        username: "mallory@northwind.example",
        uid: "northwind-1666",
        groups: &[],
    },
    // May act for every User.
    Person {
        short: "root",
        username: "root@northwind.example",
        uid: "northwind-0",
        groups: &[ADMIN_GROUP],
    },
];

/// The file of extra token lines the control plane is started with.
pub fn tokens_file(dir: &Path) -> PathBuf {
    dir.join("people.csv")
}

/// The kubeconfig of `short` in `dir`.
pub fn kubeconfig(dir: &Path, short: &str) -> PathBuf {
    dir.join("people").join(format!("{short}.kubeconfig"))
}

/// The token of `short`, read back from the tokens file.
pub fn token(dir: &Path, short: &str) -> Option<String> {
    let p = PEOPLE.iter().find(|p| p.short == short)?;
    let text = std::fs::read_to_string(tokens_file(dir)).ok()?;
    text.lines()
        .find(|l| l.split(',').nth(1) == Some(p.username))
        .and_then(|l| l.split(',').next())
        .map(str::to_string)
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> DevError {
    move |source| DevError::Io { what, source }
}

fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for i in 0..3u8 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// The token lines (`token,user,uid,"groups"`), one per person.
pub fn token_lines(tokens: &[String]) -> String {
    PEOPLE
        .iter()
        .zip(tokens)
        .map(|(p, t)| {
            let mut groups = vec![PEOPLE_GROUP];
            groups.extend(p.groups);
            format!("{t},{},{},\"{}\"\n", p.username, p.uid, groups.join(","))
        })
        .collect()
}

/// Writes the tokens file (fresh random tokens) before the control plane starts.
pub fn write_tokens(dir: &Path) -> Result<(), DevError> {
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let tokens: Vec<String> = PEOPLE.iter().map(|_| random_token()).collect();
    let path = tokens_file(dir);
    write_private(&path, &token_lines(&tokens))
}

fn write_private(path: &Path, text: &str) -> Result<(), DevError> {
    super::write_private(path, text).map_err(io(format!("write {}", path.display())))
}

/// Writes one kubeconfig per person (`<dir>/people/<short>.kubeconfig`), from the admin's with
/// the person's token in place of the admin's.
pub fn write_kubeconfigs(dir: &Path, admin: &Path) -> Result<(), DevError> {
    let text = std::fs::read_to_string(admin).map_err(io(format!("read {}", admin.display())))?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| DevError::Kubeconfig {
        path: admin.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::create_dir_all(dir.join("people"))
        .map_err(io(format!("create {}", dir.join("people").display())))?;
    for p in PEOPLE {
        let Some(t) = token(dir, p.short) else {
            continue;
        };
        let mut d = doc.clone();
        d["users"][0]["name"] = serde_yaml::Value::from(p.short);
        d["users"][0]["user"] =
            serde_yaml::to_value(serde_json::json!({ "token": t })).expect("a token is YAML");
        d["contexts"][0]["context"]["user"] = serde_yaml::Value::from(p.short);
        let out = serde_yaml::to_string(&d).expect("a kubeconfig is YAML");
        write_private(&kubeconfig(dir, p.short), &out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lines_name_each_person_with_their_groups() {
        let tokens: Vec<String> = PEOPLE.iter().map(|p| format!("t-{}", p.short)).collect();
        let lines = token_lines(&tokens);
        assert!(
            lines.contains("t-alice,alice@northwind.example,northwind-1001,\"cubicle-people\"\n")
        );
        assert!(lines.contains(
            "t-root,root@northwind.example,northwind-0,\"cubicle-people,cubicle-admins\"\n"
        ));
        assert_eq!(lines.lines().count(), PEOPLE.len());
    }

    #[test]
    fn tokens_are_random_and_long() {
        let (a, b) = (random_token(), random_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 48);
    }
}
