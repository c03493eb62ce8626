//! Reading a configuration repository offline: the input of `cubicle validate` and `cubicle
//! plan`.
//!
//! A repository is a directory (walked recursively, `*.yaml` and `*.yml`, hidden entries
//! skipped) or a kustomize tree: where a directory holds a `kustomization.yaml`, only its
//! `resources:` are read (files, or directories with their own kustomization), and its
//! `namespace:` applies to documents that name none. Multi-document YAML is split on `---`.
//! Documents of other API groups are ignored with a note. Every Cubicle object is checked the
//! way the API server would with strict field validation: bad YAML, wrong types and unknown
//! fields are refused with the file, line, object and field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::crd::v1alpha1::{Group, Server, ServerAssignment, ServerPool, Session, User, Workspace};
use crate::resolve::Directory;

/// The Cubicle kinds a repository may hold.
pub const KINDS: &[&str] = &[
    "User",
    "Group",
    "Workspace",
    "ServerPool",
    "Server",
    "ServerAssignment",
    "Session",
];

/// How notes about documents of other API groups start.
pub const IGNORED: &str = "ignored:";

/// Namespace of documents that name none, outside a kustomization that sets one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A problem that makes a document unusable (the object is left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// `Kind/name` when known.
    pub object: Option<String>,
    /// The field at fault (`spec.settings.keepaliveInterval`), or `yaml` for a syntax error.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Something worth knowing that is not a problem (an ignored document or kustomize feature).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// `Kind/name` when known.
    pub object: Option<String>,
    /// The note.
    pub message: String,
}

/// Where an object was read from.
#[derive(Debug, Clone)]
pub struct Source {
    /// The file.
    pub file: PathBuf,
    /// 1-based line where its document starts.
    pub first_line: usize,
    /// 1-based line of its `kind:` (or first content line).
    pub line: usize,
    text: Arc<str>,
}

impl Source {
    /// The 1-based line of `field` (a path such as `spec.groups[1]`) in the object's document,
    /// or of the object itself when the field cannot be found (e.g. a `status.` path).
    pub fn line_of(&self, field: &str) -> usize {
        field_line(&self.text, field)
            .map(|l| self.first_line + l)
            .unwrap_or(self.line)
    }
}

/// The objects of one namespace.
#[derive(Debug, Clone, Default)]
pub struct Namespace {
    /// Groups, workspaces, pools, servers and assignments.
    pub directory: Directory,
    /// Users, sorted by name.
    pub users: Vec<Arc<User>>,
    /// Sessions, sorted by name.
    pub sessions: Vec<Arc<Session>>,
}

/// A loaded repository.
#[derive(Debug, Default)]
pub struct Repo {
    /// The path given.
    pub root: PathBuf,
    /// Objects by namespace.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Documents refused.
    pub problems: Vec<Problem>,
    /// Documents ignored and kustomize features not applied.
    pub notes: Vec<Note>,
    /// Files read.
    pub files: usize,
    sources: HashMap<(String, String, String), Source>,
}

impl Repo {
    /// Reads the repository at `path` (a directory or a single file). Fails only when `path`
    /// itself cannot be read; every other problem is recorded in `problems`.
    pub fn load(path: &Path) -> std::io::Result<Repo> {
        let meta = std::fs::metadata(path)?;
        let mut loader = Loader {
            repo: Repo {
                root: path.to_path_buf(),
                ..Repo::default()
            },
            visited: HashSet::new(),
        };
        if meta.is_dir() {
            loader.dir(path, None);
        } else {
            loader.file(path, None);
        }
        let mut repo = loader.repo;
        for ns in repo.namespaces.values_mut() {
            let d = &mut ns.directory;
            d.groups.sort_by_key(|o| o.metadata.name.clone());
            d.workspaces.sort_by_key(|o| o.metadata.name.clone());
            d.pools.sort_by_key(|o| o.metadata.name.clone());
            d.servers.sort_by_key(|o| o.metadata.name.clone());
            d.assignments.sort_by_key(|o| o.metadata.name.clone());
            ns.users.sort_by_key(|o| o.metadata.name.clone());
            ns.sessions.sort_by_key(|o| o.metadata.name.clone());
        }
        repo.problems
            .sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        repo.notes
            .sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        Ok(repo)
    }

    /// Where object `kind`/`name` of namespace `ns` was read from.
    pub fn source(&self, kind: &str, ns: &str, name: &str) -> Option<&Source> {
        self.sources
            .get(&(kind.to_string(), ns.to_string(), name.to_string()))
    }

    /// Number of Cubicle objects read.
    pub fn objects(&self) -> usize {
        self.sources.len()
    }

    /// The file, relative to the current directory when possible, for messages.
    pub fn display_path(path: &Path) -> String {
        if path.is_relative() {
            let clean: PathBuf = path
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect();
            return if clean.as_os_str().is_empty() {
                ".".into()
            } else {
                clean.display().to_string()
            };
        }
        let cwd = std::env::current_dir().ok();
        cwd.as_deref()
            .and_then(|c| path.strip_prefix(c).ok())
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

struct Loader {
    repo: Repo,
    visited: HashSet<PathBuf>,
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn is_yaml(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    )
}

fn kustomization_in(dir: &Path) -> Option<PathBuf> {
    ["kustomization.yaml", "kustomization.yml", "Kustomization"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

impl Loader {
    fn problem(
        &mut self,
        file: &Path,
        line: usize,
        object: Option<String>,
        field: &str,
        msg: String,
    ) {
        self.repo.problems.push(Problem {
            file: file.to_path_buf(),
            line,
            object,
            field: field.into(),
            message: msg,
        });
    }

    fn note(&mut self, file: &Path, line: usize, object: Option<String>, msg: String) {
        self.repo.notes.push(Note {
            file: file.to_path_buf(),
            line,
            object,
            message: msg,
        });
    }

    fn dir(&mut self, dir: &Path, ns: Option<String>) {
        if let Some(k) = kustomization_in(dir) {
            self.kustomization(&k, ns);
            return;
        }
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
            Err(e) => {
                self.problem(dir, 0, None, "-", format!("cannot read directory: {e}"));
                return;
            }
        };
        entries.sort();
        for p in entries {
            if is_hidden(&p) {
                continue;
            }
            if p.is_dir() {
                self.dir(&p, ns.clone());
            } else if is_yaml(&p) {
                self.file(&p, ns.clone());
            }
        }
    }

    fn kustomization(&mut self, kfile: &Path, outer_ns: Option<String>) {
        let canonical = kfile.canonicalize().unwrap_or_else(|_| kfile.to_path_buf());
        if !self.visited.insert(canonical) {
            return;
        }
        self.repo.files += 1;
        let text = match std::fs::read_to_string(kfile) {
            Ok(t) => t,
            Err(e) => {
                self.problem(kfile, 0, None, "-", format!("cannot read: {e}"));
                return;
            }
        };
        let k: Value = match serde_yaml::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                let line = e.location().map(|l| l.line()).unwrap_or(1);
                self.problem(kfile, line, None, "yaml", e.to_string());
                return;
            }
        };
        let dir = kfile.parent().unwrap_or(Path::new("."));
        let ns = k
            .get("namespace")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or(outer_ns);
        for key in [
            "patches",
            "patchesStrategicMerge",
            "patchesJson6902",
            "components",
            "configMapGenerator",
            "secretGenerator",
            "replacements",
            "images",
        ] {
            if k.get(key).is_some() {
                let line = field_line(&text, key).map(|l| l + 1).unwrap_or(1);
                self.note(
                    kfile,
                    line,
                    None,
                    format!("kustomize {key} are not applied offline; objects are read as written"),
                );
            }
        }
        let mut resources: Vec<(usize, String)> = Vec::new();
        for key in ["resources", "bases"] {
            if let Some(list) = k.get(key).and_then(Value::as_array) {
                for (i, r) in list.iter().enumerate() {
                    if let Some(r) = r.as_str() {
                        let line = field_line(&text, &format!("{key}[{i}]"))
                            .map(|l| l + 1)
                            .unwrap_or(1);
                        resources.push((line, r.to_string()));
                    }
                }
            }
        }
        for (line, r) in resources {
            if r.contains("://") || r.starts_with("github.com/") || r.starts_with("git@") {
                self.note(
                    kfile,
                    line,
                    None,
                    format!("remote resource {r} is not read offline"),
                );
                continue;
            }
            let p = dir.join(&r);
            if p.is_dir() {
                match kustomization_in(&p) {
                    Some(k) => self.kustomization(&k, ns.clone()),
                    None => {
                        self.note(
                            kfile,
                            line,
                            None,
                            format!(
                                "{r} is a directory without a kustomization (kustomize refuses \
                                 it); reading its YAML files"
                            ),
                        );
                        self.dir(&p, ns.clone());
                    }
                }
            } else if p.is_file() {
                self.file(&p, ns.clone());
            } else {
                self.problem(
                    kfile,
                    line,
                    None,
                    "resources",
                    format!("resource {r} does not exist"),
                );
            }
        }
    }

    fn file(&mut self, path: &Path, ns: Option<String>) {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if !self.visited.insert(canonical) {
            return;
        }
        self.repo.files += 1;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.problem(path, 0, None, "-", format!("cannot read: {e}"));
                return;
            }
        };
        for (first_line, doc) in split_documents(&text) {
            self.document(path, first_line, doc, ns.as_deref());
        }
    }

    fn document(&mut self, file: &Path, first_line: usize, doc: &str, ns: Option<&str>) {
        let value: Value = match serde_yaml::from_str(doc) {
            Ok(v) => v,
            Err(e) => {
                let line = e
                    .location()
                    .map(|l| first_line + l.line() - 1)
                    .unwrap_or(first_line);
                let msg = e.to_string();
                // serde_yaml appends "at line L column C" relative to the document.
                let msg = match msg.rfind(" at line ") {
                    Some(i) => msg[..i].to_string(),
                    None => msg,
                };
                self.problem(file, line, None, "yaml", format!("invalid YAML: {msg}"));
                return;
            }
        };
        if value.is_null() {
            return; // an empty document (comments only)
        }
        let kind_line = field_line(doc, "kind")
            .or_else(|| first_content_line(doc))
            .map(|l| first_line + l)
            .unwrap_or(first_line);
        let Some(obj) = value.as_object() else {
            self.problem(
                file,
                kind_line,
                None,
                "-",
                "not a Kubernetes object: the document is not a mapping".into(),
            );
            return;
        };
        let api_version = obj.get("apiVersion").and_then(Value::as_str);
        let kind = obj.get("kind").and_then(Value::as_str);
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_string);
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            self.problem(
                file,
                kind_line,
                None,
                if api_version.is_none() {
                    "apiVersion"
                } else {
                    "kind"
                },
                "not a Kubernetes object: apiVersion and kind are required".into(),
            );
            return;
        };
        let label = format!("{kind}/{}", name.as_deref().unwrap_or("?"));
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        if group != crate::crd::GROUP {
            self.note(
                file,
                kind_line,
                Some(label),
                format!("{IGNORED} {api_version} is not a cubicle.dev API version"),
            );
            return;
        }
        if version != crate::crd::VERSION {
            self.problem(
                file,
                kind_line,
                Some(label),
                "apiVersion",
                format!(
                    "unknown version {api_version}: this cubicle serves {}/{}",
                    crate::crd::GROUP,
                    crate::crd::VERSION
                ),
            );
            return;
        }
        if !KINDS.contains(&kind) {
            self.problem(
                file,
                kind_line,
                Some(label),
                "kind",
                format!("unknown kind {kind}: expected one of {}", KINDS.join(", ")),
            );
            return;
        }
        let text: Arc<str> = Arc::from(doc);
        let locate = |field: &str| {
            field_line(&text, field)
                .map(|l| first_line + l)
                .unwrap_or(kind_line)
        };
        let Some(name) = name else {
            self.problem(
                file,
                locate("metadata"),
                Some(label),
                "metadata.name",
                "metadata.name is required".into(),
            );
            return;
        };
        let namespace = value
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| ns.map(str::to_string))
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        let key = (kind.to_string(), namespace.clone(), name.clone());
        if let Some(prev) = self.repo.sources.get(&key) {
            let msg = format!(
                "{kind}/{name} of namespace {namespace} is also defined at {}:{}",
                Repo::display_path(&prev.file),
                prev.line
            );
            self.problem(file, kind_line, Some(label), "metadata.name", msg);
            return;
        }
        macro_rules! typed {
            ($t:ty) => {
                match check::<$t>(&value) {
                    Ok(mut o) => {
                        o.metadata.namespace = Some(namespace.clone());
                        Arc::new(o)
                    }
                    Err((field, msg)) => {
                        let line = locate(&field);
                        self.problem(file, line, Some(label), &field, msg);
                        return;
                    }
                }
            };
        }
        let entry = self
            .repo
            .namespaces
            .entry(namespace.clone())
            .or_insert_with(|| Namespace {
                directory: Directory {
                    namespace: namespace.clone(),
                    ..Directory::default()
                },
                ..Namespace::default()
            });
        match kind {
            "User" => {
                let o = typed!(User);
                entry.users.push(o);
            }
            "Group" => {
                let o = typed!(Group);
                entry.directory.groups.push(o);
            }
            "Workspace" => {
                let o = typed!(Workspace);
                entry.directory.workspaces.push(o);
            }
            "ServerPool" => {
                let o = typed!(ServerPool);
                entry.directory.pools.push(o);
            }
            "Server" => {
                let o = typed!(Server);
                entry.directory.servers.push(o);
            }
            "ServerAssignment" => {
                let o = typed!(ServerAssignment);
                entry.directory.assignments.push(o);
            }
            _ => {
                let o = typed!(Session);
                entry.sessions.push(o);
            }
        }
        self.repo.sources.insert(
            key,
            Source {
                file: file.to_path_buf(),
                first_line,
                line: kind_line,
                text,
            },
        );
    }
}

/// Deserializes `value` as `T`, refusing type errors and unknown fields with the field's path.
fn check<T: DeserializeOwned + serde::Serialize>(value: &Value) -> Result<T, (String, String)> {
    let typed: T = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let msg = e.into_inner().to_string();
        // A missing required field is reported at the field itself.
        let missing = msg
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next());
        let field = match (missing, path.is_empty()) {
            (Some(f), true) => f.to_string(),
            (Some(f), false) => format!("{path}.{f}"),
            (None, true) => "-".to_string(),
            (None, false) => path,
        };
        (field, msg)
    })?;
    let back = serde_json::to_value(&typed).map_err(|e| ("-".to_string(), e.to_string()))?;
    let mut unknown = Vec::new();
    unknown_fields(value, &back, "", &mut unknown);
    if let Some(first) = unknown.first() {
        let (parent, field) = match first.rsplit_once('.') {
            Some((p, f)) => (p.to_string(), f.to_string()),
            None => (String::new(), first.clone()),
        };
        let field = field.split('[').next().unwrap_or(&field).to_string();
        let place = if parent.is_empty() {
            "at the top level".to_string()
        } else {
            format!("in {parent}")
        };
        let more = if unknown.len() > 1 {
            format!(
                " (and {} more: {})",
                unknown.len() - 1,
                unknown[1..].join(", ")
            )
        } else {
            String::new()
        };
        return Err((
            first.clone(),
            format!("unknown field \"{field}\" {place}{more}"),
        ));
    }
    Ok(typed)
}

fn is_empty_value(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().all(is_empty_value),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Paths of keys of `input` that the typed round trip `output` dropped.
fn unknown_fields(input: &Value, output: &Value, path: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    Some(ov) => unknown_fields(v, ov, &p, out),
                    None if is_empty_value(v) => {}
                    None => unknown_fields_of_dropped(v, &p, out),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) if i.len() == o.len() => {
            for (n, (a, b)) in i.iter().zip(o).enumerate() {
                unknown_fields(a, b, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

fn unknown_fields_of_dropped(_v: &Value, path: &str, out: &mut Vec<String>) {
    out.push(path.to_string());
}

/// Splits multi-document YAML on `---` lines. Returns each document with its 1-based first line.
pub fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        let is_sep = trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "...";
        if is_sep {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs.retain(|(_, d)| !d.trim().is_empty());
    docs
}

fn first_content_line(doc: &str) -> Option<usize> {
    doc.lines().position(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#')
    })
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Seg::Key(key));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(n) = idx.trim_end_matches(']').parse() {
                out.push(Seg::Index(n));
            }
        }
    }
    out
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

/// The 0-based line of `path` in a YAML document, found by indentation (block style; a flow
/// collection resolves to its key's line). `None` when the first segment is not found.
pub fn field_line(doc: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = doc.lines().collect();
    // The column and text of a line, past the `- ` of a sequence item when `item` is that line.
    let view = |i: usize, item: Option<usize>| -> (usize, &str) {
        let l = lines[i];
        let t = l.trim_start();
        if item == Some(i) {
            let t = t.trim_start_matches('-').trim_start();
            (l.len() - t.len(), t)
        } else {
            (l.len() - t.len(), t)
        }
    };
    let mut found: Option<usize> = None;
    let mut parent: isize = -1; // column of the enclosing key or sequence
    let mut pos: usize = 0; // where the enclosed block starts
    let mut item: Option<usize> = None; // the `- ` line the block starts on, if any
    for seg in segments(path) {
        match seg {
            Seg::Key(k) => {
                let Some(start) = (pos..lines.len()).find(|&i| is_content(lines[i])) else {
                    return found;
                };
                let (child_col, _) = view(start, item);
                if (child_col as isize) <= parent && item != Some(start) {
                    return found;
                }
                let mut hit = None;
                for i in start..lines.len() {
                    if !is_content(lines[i]) {
                        continue;
                    }
                    let (col, text) = view(i, item);
                    if i != start && (col as isize) <= parent {
                        break;
                    }
                    let is_key = (text.starts_with(k)
                        && text[k.len()..].trim_start().starts_with(':'))
                        || text.starts_with(&format!("\"{k}\":"));
                    if col == child_col && is_key {
                        hit = Some((i, col));
                        break;
                    }
                }
                let Some((i, col)) = hit else {
                    return found;
                };
                found = Some(i);
                parent = col as isize;
                pos = i + 1;
                item = None;
            }
            Seg::Index(n) => {
                let Some(key_line) = found else {
                    return None;
                };
                let after_colon = lines[key_line]
                    .split_once(':')
                    .map(|(_, v)| v.trim())
                    .unwrap_or("");
                if after_colon.starts_with('[') {
                    return Some(key_line); // a flow sequence
                }
                let mut count = 0;
                let mut seq_col = None;
                let mut hit = None;
                for (i, l) in lines.iter().enumerate().skip(key_line + 1) {
                    if !is_content(l) {
                        continue;
                    }
                    let ind = indent_of(l);
                    let t = l.trim_start();
                    let is_item = t.starts_with("- ") || t == "-";
                    let sc = match seq_col {
                        Some(c) => c,
                        None if is_item && ind as isize >= parent => {
                            seq_col = Some(ind);
                            ind
                        }
                        None => return Some(key_line),
                    };
                    if ind < sc || (ind == sc && !is_item) {
                        break;
                    }
                    if ind == sc && is_item {
                        if count == n {
                            hit = Some((i, sc));
                            break;
                        }
                        count += 1;
                    }
                }
                let Some((i, sc)) = hit else {
                    return found;
                };
                found = Some(i);
                parent = sc as isize;
                pos = i;
                item = Some(i);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
# a comment
apiVersion: cubicle.dev/v1alpha1
kind: Group
metadata:
  name: g
spec:
  priority: 10
  settings:
    keepaliveInterval: 5m
    volumeMappings:
    - name: a
      mountPath: /a
    - name: b
      mountPath: /b
      source:
        emptyDir: {}
  groups: [x, y]
";

    #[test]
    fn field_lines_follow_indentation_and_sequences() {
        assert_eq!(field_line(DOC, "kind"), Some(2));
        assert_eq!(field_line(DOC, "metadata.name"), Some(4));
        assert_eq!(field_line(DOC, "spec.priority"), Some(6));
        assert_eq!(field_line(DOC, "spec.settings.keepaliveInterval"), Some(8));
        assert_eq!(field_line(DOC, "spec.settings.volumeMappings[0]"), Some(10));
        assert_eq!(field_line(DOC, "spec.settings.volumeMappings[1]"), Some(12));
        assert_eq!(
            field_line(DOC, "spec.settings.volumeMappings[1].name"),
            Some(12)
        );
        assert_eq!(
            field_line(DOC, "spec.settings.volumeMappings[1].mountPath"),
            Some(13)
        );
        assert_eq!(
            field_line(DOC, "spec.settings.volumeMappings[1].source.emptyDir"),
            Some(15)
        );
        assert_eq!(field_line(DOC, "spec.groups[1]"), Some(16));
        // The deepest segment found.
        assert_eq!(field_line(DOC, "spec.nothing"), Some(5));
        assert_eq!(field_line(DOC, "status.effectiveSettings"), None);
        // A key of the same name deeper in another branch is not taken.
        assert_eq!(field_line(DOC, "name"), None);
    }

    #[test]
    fn documents_split_on_separators_with_their_lines() {
        let text = "a: 1\n---\n# only a comment\n---\nb: 2\nc: 3\n--- \nd: 4\n";
        let docs = split_documents(text);
        assert_eq!(
            docs.iter().map(|d| d.0).collect::<Vec<_>>(),
            vec![1, 3, 5, 8]
        );
        assert_eq!(docs[2].1, "b: 2\nc: 3\n");
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let v: Value = serde_yaml::from_str(
            "apiVersion: cubicle.dev/v1alpha1\nkind: Group\nmetadata: {name: g}\n\
             spec: {priority: 1, settings: {keepAliveInterval: 5m, controlPanel: {}}}\n",
        )
        .unwrap();
        let err = check::<Group>(&v).unwrap_err();
        assert_eq!(err.0, "spec.settings.keepAliveInterval");
        assert!(
            err.1
                .contains("unknown field \"keepAliveInterval\" in spec.settings"),
            "{}",
            err.1
        );
        let v: Value = serde_yaml::from_str(
            "apiVersion: cubicle.dev/v1alpha1\nkind: Group\nmetadata: {name: g}\n\
             spec: {priority: high}\n",
        )
        .unwrap();
        let err = check::<Group>(&v).unwrap_err();
        assert_eq!(err.0, "spec.priority");
        assert!(err.1.contains("invalid type"), "{}", err.1);
        let v: Value = serde_yaml::from_str(
            "apiVersion: cubicle.dev/v1alpha1\nkind: Group\nmetadata: {name: g, labels: {}}\n\
             spec: {priority: 1, settings: {}}\n",
        )
        .unwrap();
        assert!(
            check::<Group>(&v).is_ok(),
            "empty values are not unknown fields"
        );
    }
}
