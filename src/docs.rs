//! Documentation generated from the API itself, so that the README cannot drift from the CRDs.
//!
//! [`kasm_table`] renders the Kasm-name-to-Cubicle-field table from the field descriptions of
//! [`crate::crd::all`]: every field that re-creates a Kasm setting or property says so in its doc
//! comment, either as a sentence `Kasm: <name>.` or in parentheses `(Kasm: <name>)`. Fields
//! without such a mention are Cubicle's own and are not listed.

use serde_json::Value;

/// One row: a Cubicle field and the Kasm name it re-creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KasmRow {
    /// The Cubicle kind.
    pub kind: String,
    /// The field path (`spec.settings.allowKasmPause`, `[]` for list items); empty for the
    /// kind itself.
    pub path: String,
    /// The Kasm name, as the description gives it (Markdown).
    pub kasm: String,
}

/// The Kasm name a description mentions, if any: `(Kasm: X)` or a sentence `Kasm: X.` (to the end
/// of its paragraph). `Kasm's` and other uses of the word do not count.
pub fn kasm_name(description: &str) -> Option<String> {
    const MARK: &str = "Kasm: ";
    let at = description.find(MARK)?;
    let rest = &description[at + MARK.len()..];
    let parenthesised = description[..at].ends_with('(');
    let text = if parenthesised {
        let mut depth = 0usize;
        let end = rest.char_indices().find_map(|(i, c)| match c {
            '(' => {
                depth += 1;
                None
            }
            ')' if depth == 0 => Some(i),
            ')' => {
                depth -= 1;
                None
            }
            _ => None,
        })?;
        &rest[..end]
    } else {
        let paragraph = rest.split("\n\n").next().unwrap_or(rest);
        paragraph.trim_end().strip_suffix('.').unwrap_or(paragraph)
    };
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    (!text.is_empty()).then_some(text)
}

/// Every row, from the CRDs of [`crate::crd::all`] (sorted by CRD name), fields in schema order.
pub fn kasm_rows() -> Vec<KasmRow> {
    let mut rows = Vec::new();
    for crd in crate::crd::all() {
        let kind = crd.spec.names.kind.clone();
        for version in &crd.spec.versions {
            let Some(schema) = version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
            else {
                continue;
            };
            let schema = serde_json::to_value(schema).expect("a schema serializes");
            walk(&kind, &schema, String::new(), &mut rows);
        }
    }
    rows
}

fn walk(kind: &str, node: &Value, path: String, rows: &mut Vec<KasmRow>) {
    if let Some(kasm) = node["description"].as_str().and_then(kasm_name) {
        rows.push(KasmRow {
            kind: kind.to_string(),
            path: path.clone(),
            kasm,
        });
    }
    if let Some(props) = node["properties"].as_object() {
        for (name, child) in props {
            let p = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            walk(kind, child, p, rows);
        }
    }
    if node["items"].is_object() {
        walk(kind, &node["items"], format!("{path}[]"), rows);
    }
    if node["additionalProperties"].is_object() {
        walk(
            kind,
            &node["additionalProperties"],
            format!("{path}.*"),
            rows,
        );
    }
}

/// The Markdown table: Cubicle field, Kasm name, kind. What `cubicle docs kasm-table` prints.
pub fn kasm_table() -> String {
    let mut out = String::from("| Cubicle field | Kasm | Kind |\n|---|---|---|\n");
    for r in kasm_rows() {
        let field = if r.path.is_empty() {
            "(the kind itself)".to_string()
        } else {
            format!("`{}`", r.path)
        };
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            field,
            r.kasm.replace('|', "\\|"),
            r.kind
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sentence_and_parenthesised_mentions() {
        assert_eq!(
            kasm_name("Email address. Kasm: `email`.").as_deref(),
            Some("`email`")
        );
        assert_eq!(
            kasm_name("The account is locked. Kasm: `locked` (Lock account).").as_deref(),
            Some("`locked` (Lock account)")
        );
        assert_eq!(
            kasm_name("A Cubicle Session (Kasm: a session, \"a Kasm\"): one user's instance.")
                .as_deref(),
            Some("a session, \"a Kasm\"")
        );
        assert_eq!(
            kasm_name("A directory (Kasm: `volume_mapping`, one entry of it).\n\nMore text.")
                .as_deref(),
            Some("`volume_mapping`, one entry of it")
        );
        assert_eq!(
            kasm_name("A thing. Kasm: first line\nwrapped.\n\nNext paragraph.").as_deref(),
            Some("first line wrapped")
        );
        assert_eq!(kasm_name("Kasm's default applies."), None);
        assert_eq!(kasm_name("Cubicle's own field."), None);
    }

    #[test]
    fn the_table_covers_every_kind_and_the_well_known_settings() {
        let rows = kasm_rows();
        for kind in [
            "User",
            "Group",
            "Workspace",
            "ServerPool",
            "Server",
            "ServerAssignment",
            "Session",
        ] {
            assert!(
                rows.iter().any(|r| r.kind == kind && r.path.is_empty()),
                "{kind} names its Kasm counterpart"
            );
        }
        let has = |kind: &str, path: &str, kasm: &str| {
            rows.iter()
                .any(|r| r.kind == kind && r.path == path && r.kasm == kasm)
        };
        assert!(has(
            "Group",
            "spec.settings.keepaliveExpiration",
            "`keepalive_expiration` (seconds)"
        ));
        assert!(has(
            "Group",
            "spec.settings.allowKasmPause",
            "`allow_kasm_pause`"
        ));
        assert!(has("User", "spec.disabled", "`locked` (Lock account)"));
        let table = kasm_table();
        assert_eq!(table.lines().count(), rows.len() + 2);
        assert!(table.ends_with('\n'));
    }
}
