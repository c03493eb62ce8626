//! Benchmark of the offline planner: generates a configuration repository (by default 10,000
//! users and 200 groups, plus workspaces, pools, servers and assignments), then runs
//! `validate` and `plan` over it and prints wall time and peak memory (VmHWM).
//!
//! ```text
//! cargo bench --bench plan                       # 10,000 users, 200 groups
//! cargo bench --bench plan -- --users 50000 --groups 500
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A writer that only counts bytes.
struct Count(u64);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resets the peak RSS (VmHWM) to the current RSS, so a phase's peak can be measured.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn mb(kb: Option<u64>) -> String {
    kb.map(|k| format!("{:.0} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "n/a".into())
}

fn generate(dir: &Path, users: usize, groups: usize) -> std::io::Result<(usize, u64)> {
    let mut rng = Rng(42);
    let ns = "bench";
    let mut files = 0;
    let mut bytes = 0u64;
    let mut write = |rel: &str, text: &str| -> std::io::Result<()> {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap_or(dir))?;
        std::fs::write(&p, text)?;
        files += 1;
        bytes += text.len() as u64;
        Ok(())
    };
    write(
        "kustomization.yaml",
        &format!(
            "namespace: {ns}\nresources:\n- groups.yaml\n- workspaces.yaml\n- servers.yaml\n- users\n"
        ),
    )?;
    write(
        "users/kustomization.yaml",
        &format!(
            "resources:\n{}",
            (0..users.div_ceil(1000))
                .map(|i| format!("- users-{i:03}.yaml\n"))
                .collect::<String>()
        ),
    )?;
    // Groups: priorities 1..N (every 40th shares its neighbour's), a few settings each, some
    // mappings; group 0 adds every local user.
    const BOOLS: &[&str] = &[
        "allowKasmAudio",
        "allowKasmDownloads",
        "allowKasmUploads",
        "allowKasmStop",
        "allowKasmPause",
        "allowKasmSharing",
        "allowZoneSelection",
        "allowPersistentProfile",
        "exposeUserEnv",
        "injectSshKeys",
        "require2fa",
    ];
    let mut g = String::new();
    for i in 0..groups {
        let priority = if i % 40 == 39 { i } else { i + 1 };
        g.push_str(&format!(
            "---\napiVersion: cubicle.dev/v1alpha1\nkind: Group\nmetadata:\n  name: group-{i:04}\nspec:\n  priority: {priority}\n  description: Generated group {i}\n  settings:\n"
        ));
        if i == 0 {
            g.push_str("    autoAddLocalUsers: true\n    keepaliveExpiration: 1h\n    keepaliveInterval: 5m\n    idleDisconnect: 20m\n");
        }
        for b in BOOLS {
            if rng.below(3) == 0 {
                g.push_str(&format!("    {b}: {}\n", rng.below(2) == 0));
            }
        }
        if rng.below(4) == 0 {
            g.push_str(&format!("    maxKasmsPerUser: {}\n", 1 + rng.below(5)));
        }
        if rng.below(5) == 0 {
            g.push_str(&format!("    keepaliveExpiration: {}h\n", 1 + rng.below(4)));
        }
        if rng.below(10) == 0 {
            g.push_str("    usageLimit: {type: perUser, interval: weekly, hours: 40}\n");
        }
        if rng.below(3) == 0 {
            g.push_str(&format!(
                "    controlPanel:\n      showLogout: {}\n      advancedSettings:\n        showGameMode: {}\n",
                rng.below(2) == 0,
                rng.below(2) == 0
            ));
        }
        g.push_str(&format!(
            "    volumeMappings:\n    - name: data-{i}\n      mountPath: /mnt/group-{}\n      readOnly: true\n      source:\n        persistentVolumeClaim:\n          claimName: data-{i}\n",
            i % 150
        ));
        g.push_str(&format!(
            "    fileMappings:\n    - destination: /etc/cubicle/group-{}.conf\n      content:\n        inline: \"group {i}\\n\"\n",
            i % 120
        ));
    }
    write("groups.yaml", &g)?;
    let mut w = String::new();
    for i in 0..10 {
        let pool = match i % 3 {
            0 => "  serverPool: dedicated\n",
            1 => "  serverPool: shared\n",
            _ => "",
        };
        w.push_str(&format!(
            "---\napiVersion: cubicle.dev/v1alpha1\nkind: Workspace\nmetadata:\n  name: ws-{i}\nspec:\n  image: registry.example/ws-{i}:1\n  groups: [group-{:04}, group-{:04}, group-{:04}]\n{pool}",
            rng.below(groups as u64),
            rng.below(groups as u64),
            rng.below(groups as u64)
        ));
    }
    write("workspaces.yaml", &w)?;
    let mut s = String::from(
        "---\napiVersion: cubicle.dev/v1alpha1\nkind: ServerPool\nmetadata:\n  name: dedicated\nspec:\n  assignmentEnabled: true\n---\napiVersion: cubicle.dev/v1alpha1\nkind: ServerPool\nmetadata:\n  name: shared\nspec: {}\n",
    );
    for i in 0..50 {
        let pool = if i < 40 { "dedicated" } else { "shared" };
        s.push_str(&format!(
            "---\napiVersion: cubicle.dev/v1alpha1\nkind: Server\nmetadata:\n  name: srv-{i:02}\nspec:\n  pool: {pool}\n  nodeName: node-{i}\n  maxSessions: 8\n"
        ));
    }
    for a in 0..users.div_ceil(10) {
        let members: Vec<String> = (a * 10..(a * 10 + 10).min(users))
            .map(|u| format!("user-{u:05}"))
            .collect();
        s.push_str(&format!(
            "---\napiVersion: cubicle.dev/v1alpha1\nkind: ServerAssignment\nmetadata:\n  name: team-{a:04}\nspec:\n  users: [{}]\n  servers: [srv-{:02}]\n",
            members.join(", "),
            rng.below(50)
        ));
    }
    write("servers.yaml", &s)?;
    for f in 0..users.div_ceil(1000) {
        let mut u = String::new();
        for i in f * 1000..((f + 1) * 1000).min(users) {
            let realm = if rng.below(5) == 0 { "ldap" } else { "local" };
            let gs: Vec<String> = (0..3)
                .map(|_| format!("group-{:04}", rng.below(groups as u64)))
                .collect();
            u.push_str(&format!(
                "---\napiVersion: cubicle.dev/v1alpha1\nkind: User\nmetadata:\n  name: user-{i:05}\nspec:\n  realm: {realm}\n  firstName: User\n  lastName: Number{i}\n  email: user-{i}@example.invalid\n  groups: [{}]\n",
                gs.join(", ")
            ));
            if rng.below(4) == 0 {
                u.push_str(&format!(
                    "  settings:\n    defaultWorkspace: ws-{}\n    theme: dark\n",
                    rng.below(10)
                ));
            }
        }
        write(&format!("users/users-{f:03}.yaml"), &u)?;
    }
    Ok((files, bytes))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let users = arg("--users", 10_000);
    let groups = arg("--groups", 200);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("cubicle-bench-plan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let t = Instant::now();
    let (files, bytes) = generate(&dir, users, groups).expect("generate the repository");
    println!(
        "plan benchmark: {users} users, {groups} groups, {files} files, {:.1} MiB of YAML (generated in {:.2} s)",
        bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );

    let mut err = Count(0);
    reset_peak();
    let t = Instant::now();
    let mut out = Count(0);
    let code = cubicle::plan::validate(&dir, false, &mut out, &mut err);
    println!(
        "validate:           {:>6.2} s  peak {:>8}  ({} bytes of diagnostics, exit {code})",
        t.elapsed().as_secs_f64(),
        mb(status_kb("VmHWM:")),
        out.0
    );

    for (name, format) in [
        ("plan --output json", cubicle::plan::Format::Json),
        ("plan --output text", cubicle::plan::Format::Text),
    ] {
        reset_peak();
        let t = Instant::now();
        let mut out = Count(0);
        let code = cubicle::plan::plan(&dir, format, None, &mut out, &mut err);
        println!(
            "{name}: {:>6.2} s  peak {:>8}  ({:.1} MiB written, exit {code})",
            t.elapsed().as_secs_f64(),
            mb(status_kb("VmHWM:")),
            out.0 as f64 / 1048576.0
        );
    }
    let t = Instant::now();
    let mut out = Count(0);
    cubicle::plan::plan(
        &dir,
        cubicle::plan::Format::Text,
        Some("user-00042"),
        &mut out,
        &mut err,
    );
    println!("plan --user (one):  {:>6.2} s", t.elapsed().as_secs_f64());
    println!(
        "process peak memory (VmHWM since last reset): {}",
        mb(status_kb("VmHWM:"))
    );
    let _ = std::fs::remove_dir_all(&dir);
}
