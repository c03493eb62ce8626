//! The README stays true to the code: its Kasm-name table is what `cubicle docs kasm-table`
//! prints from the CRD descriptions, and its configuration reference names every flag of
//! `cubicle run`.

use std::path::Path;
use std::process::Command;

const START: &str = "<!-- kasm-table:start -->";
const END: &str = "<!-- kasm-table:end -->";

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md")
}

fn cubicle(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cubicle"))
        .args(args)
        .output()
        .expect("run cubicle");
    assert!(
        out.status.success(),
        "cubicle {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn the_kasm_table_is_generated_from_the_crds() {
    let readme = readme();
    let start = readme
        .find(START)
        .unwrap_or_else(|| panic!("README.md has no {START} marker"));
    let end = readme
        .find(END)
        .unwrap_or_else(|| panic!("README.md has no {END} marker"));
    assert!(start < end, "the markers are out of order");
    let in_readme = readme[start + START.len()..end].trim();
    let generated = cubicle(&["docs", "kasm-table"]);
    assert!(
        generated.lines().count() > 100,
        "the table has {} lines",
        generated.lines().count()
    );
    if in_readme != generated.trim() {
        let first = in_readme
            .lines()
            .zip(generated.trim().lines())
            .find(|(a, b)| a != b);
        panic!(
            "README.md's Kasm table differs from the CRDs (first difference: {first:?}). \
             Regenerate it: replace the lines between {START} and {END} with the output of \
             `cargo run -q -- docs kasm-table`"
        );
    }
}

/// Every long flag `cubicle run --help` lists (and its environment variable) appears in the
/// README's configuration reference.
#[test]
fn the_configuration_reference_names_every_run_flag() {
    let readme = readme();
    let help = cubicle(&["run", "--help"]);
    let mut flags = 0;
    for line in help.lines() {
        let line = line.trim_start();
        let Some(rest) = line.strip_prefix("--") else {
            continue;
        };
        let flag: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if flag == "help" {
            continue;
        }
        flags += 1;
        assert!(
            readme.contains(&format!("`--{flag}")),
            "README.md does not document `cubicle run --{flag}`"
        );
    }
    assert!(flags >= 12, "only {flags} flags found in:\n{help}");
    for env in help
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next())
    {
        assert!(
            readme.contains(&format!("`{env}`")),
            "README.md does not document the environment variable {env}"
        );
    }
}

/// Every YAML example in the README (Helm values, Argo CD and Flux objects, the NetworkPolicy)
/// parses, and each document names its apiVersion, kind and metadata.name.
#[test]
fn every_yaml_block_parses() {
    let readme = readme();
    let mut blocks = 0;
    let mut rest = readme.as_str();
    while let Some(start) = rest.find("```yaml\n") {
        // A block inside a list item is indented like its fence.
        let line_start = rest[..start].rfind('\n').map_or(0, |i| i + 1);
        let indent = &rest[line_start..start];
        let body = &rest[start + 8..];
        let end = body.find("```").expect("a closed code block");
        let block = body[..end]
            .lines()
            .map(|l| l.strip_prefix(indent).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        for doc in serde_yaml::Deserializer::from_str(&block) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("a README YAML block does not parse: {e}\n{block}"));
            for key in ["apiVersion", "kind"] {
                assert!(v[key].is_string(), "no {key} in:\n{block}");
            }
            assert!(v["metadata"]["name"].is_string(), "no name in:\n{block}");
        }
        blocks += 1;
        rest = &body[end + 3..];
    }
    assert!(blocks >= 4, "only {blocks} YAML blocks");
}
