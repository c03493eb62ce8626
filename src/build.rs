//! Puts the git commit the binary is built from into `cubicle --version`.
//!
//! `CUBICLE_GIT_COMMIT`, when set, wins (image builds from a tree without `.git`); otherwise
//! `git rev-parse`; otherwise `unknown`. The script reruns when HEAD moves, so a new commit
//! rebuilds with its own hash.
use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=CUBICLE_GIT_COMMIT");
    let commit = std::env::var("CUBICLE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // HEAD itself (a checkout), the branch it points to (a commit) and packed-refs (a gc).
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            // A path that does not exist would rerun the script on every build.
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    println!("cargo:rustc-env=CUBICLE_GIT_COMMIT={commit}");
}
