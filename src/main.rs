//! The `cubicle` command: the operator, and tools around it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cubicle::devenv::{DevCluster, DevOptions};

/// glibc's allocator keeps freed memory in its arenas; `malloc_trim` gives the free pages back.
/// The operator calls it once its watches go quiet ([`cubicle::controller::stores`]); the
/// library itself has no unsafe code, so the binding lives here.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod glibc {
    unsafe extern "C" {
        /// Releases free memory at the top of the main heap and, since glibc 2.8, every whole
        /// free page of every arena; keeps `pad` bytes at the top. Thread-safe (it takes each
        /// arena's lock), no preconditions: safe to call at any time.
        safe fn malloc_trim(pad: usize) -> std::ffi::c_int;
        /// Sets an allocator parameter; returns 1 on success. Safe: it only changes how later
        /// allocations are served.
        safe fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }

    /// glibc's `M_ARENA_MAX`.
    const M_ARENA_MAX: std::ffi::c_int = -8;

    /// One heap for every thread. glibc gives each thread that contends for a lock an arena of
    /// its own (up to 8 per core); the operator's Tokio workers each filled one, every arena
    /// growing to its own peak and keeping its own free space, as tasks move between threads.
    /// Called before any thread is started.
    pub fn one_arena() {
        mallopt(M_ARENA_MAX, 1);
    }

    /// Gives the heap's freed pages back to the OS.
    pub fn release_free_memory() {
        malloc_trim(0);
    }
}

#[derive(Parser)]
#[command(
    name = "cubicle",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("CUBICLE_GIT_COMMIT"), ")"),
    about = "Kasm-style workspaces on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A local development environment (no cluster needed).
    #[command(subcommand)]
    Dev(DevCommand),
    /// Run the operator (in a cluster, or against the cluster of the current kubeconfig).
    Run(Box<RunArgs>),
    /// Run the gateway: the way from a browser to a session (a reverse proxy routing by host
    /// name, authorizing every connection, keeping sessions alive while connected).
    Gateway(Box<GatewayArgs>),
    /// Mark a session as active (one small API call: sets its `cubicle.dev/keepalive`
    /// annotation to now). Clients send this every keepaliveInterval while a user is connected.
    Keepalive {
        /// The Session's name.
        session: String,
        /// Its namespace (default: the kubeconfig's).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Launch a Workspace as yourself (the User whose spec.identity is who your kubeconfig
    /// says you are). Refused launches print one line naming you, the User and the rule, and
    /// leave nothing behind.
    Launch {
        /// The Workspace.
        workspace: String,
        /// Persistent profile: Enabled, Disabled or Reset.
        #[arg(long, value_parser = ["Enabled", "Disabled", "Reset"])]
        profile: Option<String>,
        /// The zone to run in (when your groups allow zone selection).
        #[arg(long)]
        zone: Option<String>,
        /// Wait until the session runs (or is refused, with the operator's reason).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[command(flatten)]
        target: PeopleTarget,
    },
    /// Your sessions: phase, node, expiry time and the rule that sets it, usage used and left.
    Sessions {
        #[command(flatten)]
        target: PeopleTarget,
    },
    /// Stop one of your sessions (pod removed, profile kept).
    Stop {
        /// The Session's name.
        session: String,
        #[command(flatten)]
        target: PeopleTarget,
    },
    /// Pause one of your sessions (pod kept, access cut).
    Pause {
        /// The Session's name.
        session: String,
        #[command(flatten)]
        target: PeopleTarget,
    },
    /// Resume one of your stopped or paused sessions.
    Resume {
        /// The Session's name.
        session: String,
        #[command(flatten)]
        target: PeopleTarget,
    },
    /// Delete one of your sessions.
    Delete {
        /// The Session's name.
        session: String,
        #[command(flatten)]
        target: PeopleTarget,
    },
    /// Measure the operator against the floor on its own local control plane: API requests per
    /// launch and per resync, burst convergence (N sessions at once) against a plain client
    /// creating the same claims and pods, memory and CPU. Prints a table (or JSON).
    Bench(Box<cubicle::bench::BenchArgs>),
    /// Measure how late session deadlines are enforced: N sessions with a sessionTimeLimit on
    /// the local control plane, the operator as a child process; prints the lateness of the
    /// action's start (its log) and of the deletion landing (a watch), p50/p99/max, per N.
    BenchExpiry(Box<cubicle::bench::expiry::ExpiryArgs>),
    /// Measure the gateway on the local control plane against going straight to the desktop:
    /// WebSocket round trips (p50/p99 added), a large stream's throughput, N open connections
    /// (the gateway's memory, idle CPU, keepalive writes per interval), Running to URL
    /// answering. Prints a table.
    BenchGateway(Box<cubicle::bench::gateway::GatewayBenchArgs>),
    /// Print the CustomResourceDefinitions of the Cubicle API as one multi-document YAML stream,
    /// or write one file per CRD (`<plural>.cubicle.dev.yaml`) into a directory.
    Crds {
        /// Write one file per CRD into this directory instead of printing them.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Check a configuration repository offline (a directory of YAML, or a kustomize tree):
    /// bad YAML, unknown fields, unknown references, priority ties, inconsistent settings.
    /// Prints `file:line: Kind/name: field: severity: message`; exits 1 on errors.
    Validate {
        /// The repository (directory or file).
        dir: PathBuf,
        /// Also fail on warnings.
        #[arg(long)]
        strict: bool,
    },
    /// Show what each user of a configuration repository effectively gets: groups, settings
    /// with provenance, assigned servers, and which workspaces they may launch and where.
    Plan {
        /// The repository (directory or file).
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        output: cubicle::plan::Format,
        /// Only this user (object name or username).
        #[arg(long)]
        user: Option<String>,
    },
    /// Documentation generated from the API (for the README).
    #[command(subcommand, hide = true)]
    Docs(DocsCommand),
}

/// Where the people commands act: the kubeconfig (default: $KUBECONFIG, then ~/.kube/config)
/// and the namespace (default: the kubeconfig context's).
#[derive(clap::Args)]
struct PeopleTarget {
    /// Namespace (default: the kubeconfig's).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Kubeconfig file.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DocsCommand {
    /// Print the Kasm-name-to-Cubicle-field table (Markdown) from the CRD descriptions.
    KasmTable,
}

#[derive(clap::Args)]
struct GatewayArgs {
    /// The public address: scheme, base domain and port, e.g. `https://cubicle.example.com`.
    /// The portal is on the base domain, each session on `<session uid>.<base domain>`.
    #[arg(long, env = "CUBICLE_PUBLIC_URL")]
    public_url: String,
    /// Address to listen on (HTTP/1.1; TLS is terminated in front, by the Ingress or Gateway).
    #[arg(long, env = "CUBICLE_GATEWAY_LISTEN", default_value = "0.0.0.0:8000")]
    listen: std::net::SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "CUBICLE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Namespace whose sessions are served; repeat for several. None: every namespace.
    #[arg(long = "namespace", env = "CUBICLE_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Trust this request header for the username (behind oauth2-proxy, e.g.
    /// `X-Auth-Request-User`). Only that proxy may reach the gateway.
    #[arg(long, env = "CUBICLE_TRUSTED_USER_HEADER")]
    trusted_user_header: Option<String>,
    /// With --trusted-user-header: the groups header (comma-separated).
    #[arg(long, env = "CUBICLE_TRUSTED_GROUPS_HEADER")]
    trusted_groups_header: Option<String>,
    /// OpenID Connect login: the issuer URL (authorization code with PKCE on the portal).
    #[arg(long, env = "CUBICLE_OIDC_ISSUER")]
    oidc_issuer: Option<String>,
    /// OIDC client id.
    #[arg(long, env = "CUBICLE_OIDC_CLIENT_ID", default_value = "cubicle")]
    oidc_client_id: String,
    /// OIDC client secret (better: from the environment, out of the process list).
    #[arg(long, env = "CUBICLE_OIDC_CLIENT_SECRET", hide_env_values = true)]
    oidc_client_secret: Option<String>,
    /// The ID token claim naming the person: `sub` (stable), `email` or `preferred_username`;
    /// it must match the API server's `--oidc-username-claim`.
    #[arg(long, env = "CUBICLE_OIDC_USERNAME_CLAIM", default_value = "sub")]
    oidc_username_claim: String,
    /// The ID token claim listing the person's groups (a list of strings, or one string), as the
    /// API server's `--oidc-groups-claim`; the gateway's SubjectAccessReview carries them, with
    /// --groups-prefix, so group RoleBindings work. Empty: take no groups from the token.
    #[arg(long, env = "CUBICLE_OIDC_GROUPS_CLAIM", default_value = "groups")]
    oidc_groups_claim: String,
    /// Extra CA certificates (PEM) to trust for an https issuer.
    #[arg(long, env = "CUBICLE_OIDC_CA_FILE")]
    oidc_ca_file: Option<PathBuf>,
    /// Prefix of usernames, as the API server's authenticator adds it (e.g. `oidc:`), so the
    /// SubjectAccessReview names the person as RBAC does.
    #[arg(long, env = "CUBICLE_USERNAME_PREFIX", default_value = "oidc:")]
    username_prefix: String,
    /// Prefix of group names.
    #[arg(long, env = "CUBICLE_GROUPS_PREFIX", default_value = "oidc:")]
    groups_prefix: String,
    /// The master key's Secret, `namespace/name` (the operator creates it).
    #[arg(long, env = "CUBICLE_KEY_SECRET")]
    key_secret: Option<String>,
    /// Also shut down when standard input closes (used by `cubicle dev up --demo`).
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,
    /// Log format.
    #[arg(long, env = "CUBICLE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: cubicle::telemetry::LogFormat,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespace to watch; repeat for several. None: every namespace.
    #[arg(long = "namespace", env = "CUBICLE_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "CUBICLE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Log format.
    #[arg(long, env = "CUBICLE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: cubicle::telemetry::LogFormat,
    /// Elect a leader on a Lease so that only one replica writes.
    #[arg(long, env = "CUBICLE_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// Name of the Lease.
    #[arg(long, default_value = "cubicle-leader")]
    lease_name: String,
    /// How long a lease is valid after its last renewal.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// A leader that could not renew for this long stops (must be shorter than the lease).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    renew_deadline: Duration,
    /// How often to try to acquire or renew the lease.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    retry_period: Duration,
    /// This replica's identity in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Client-side API budget: sustained requests per second (0: unlimited).
    #[arg(long, env = "CUBICLE_API_QPS", default_value_t = 50.0)]
    api_qps: f64,
    /// Client-side API budget: burst above the sustained rate.
    #[arg(long, env = "CUBICLE_API_BURST", default_value_t = 100)]
    api_burst: u32,
    /// Parallel reconciles per controller.
    #[arg(long, env = "CUBICLE_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Re-check every object from the cache once per interval (a safety net that writes nothing
    /// when steady; deadlines never wait for it). 0: never. A steady operator spends about a
    /// quarter of a millisecond of CPU per object per interval.
    #[arg(long, env = "CUBICLE_RESYNC", default_value = "10h", value_parser = parse_resync)]
    resync: Duration,
    /// Also shut down when standard input closes (used by `cubicle dev` and the tests, so the
    /// operator never outlives the process that started it).
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,
    /// Give each session a desktop password (Kasm's `VNC_PW`) in a Secret of its own, derived
    /// from a master key the operator keeps in the Secret `--key-secret` (created if absent).
    #[arg(long, env = "CUBICLE_SESSION_CREDENTIALS")]
    session_credentials: bool,
    /// The master key's Secret (in the operator's namespace, `POD_NAMESPACE`).
    #[arg(long, env = "CUBICLE_KEY_SECRET", default_value = cubicle::credentials::DEFAULT_KEY_SECRET)]
    key_secret: String,
    /// The gateway's public address (e.g. `https://cubicle.example.com`): Running sessions get
    /// `status.url` on it.
    #[arg(long, env = "CUBICLE_PUBLIC_URL")]
    public_url: Option<String>,
}

/// A resync interval: 0 (none), or at least a minute (a shorter one is a polling loop).
fn parse_resync(s: &str) -> Result<Duration, String> {
    cubicle::controller::check_resync(parse_duration(s)?)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 500ms, 15s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Subcommand)]
enum DevCommand {
    /// Start the project's own local Kubernetes control plane with fake nodes and storage, and
    /// keep it running until interrupted (Ctrl-C). Prints the KUBECONFIG to use.
    Up {
        /// Working directory: PKI, kubeconfig, component logs.
        #[arg(long, default_value = ".cubicle/dev")]
        dir: PathBuf,
        /// Number of fake nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Number of zones (`zone-a`, `zone-b`, ...) the nodes are spread over.
        #[arg(long, default_value_t = 3)]
        zones: usize,
        /// Seconds to wait for the control plane to become ready.
        #[arg(long, default_value_t = 240)]
        timeout: u64,
        /// Also stop when standard input closes (used by the test harness).
        #[arg(long)]
        exit_on_stdin_eof: bool,
        /// Also start a real node (containerd, runc, the CNI bridge and a kubelet; needs root) with
        /// the images built here (tests/images). Pods run there only if they select and tolerate
        /// `cubicle.dev/real-node=true`. Where the host cannot run containers, a message says what
        /// is missing and the fake nodes carry on.
        #[arg(long)]
        real_node: bool,
        /// Images the real node gets besides the pause image: `operator` (this binary) and/or
        /// `desktop`; built once per input hash, cached in ~/.cache/cubicle/images.
        #[arg(long, value_delimiter = ',', default_value = "operator,desktop")]
        node_images: Vec<String>,
        /// The quickstart: also install the CRDs, apply the examples, run the operator
        /// (`cubicle run`, logging to DIR/logs/operator.log) and print session phase changes.
        #[arg(long)]
        demo: bool,
        /// Also run a local OpenID Provider (https, with a CA generated in DIR/oidc-tls) for the
        /// demo people (signing in with their identity, e.g. alice@northwind.example), trusted by
        /// the API server (`--authentication-config`): an ID token acts as `oidc:<identity>` in
        /// groups `oidc:<group>`. Its URL, client and the people's
        /// passwords go to DIR/oidc/issuer.json. Implied by `--demo --gateway-port`.
        #[arg(long)]
        oidc: bool,
        #[command(flatten)]
        demo_args: DemoArgs,
    },
    /// The quickstart on the cluster of a kubeconfig: install the CRDs, apply the examples, run
    /// the operator (`cubicle run`) on their namespace and print session phase changes until
    /// interrupted (Ctrl-C).
    Demo {
        /// The cluster's kubeconfig (default: $KUBECONFIG, then ~/.kube/config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Directory of operator.log.
        #[arg(long, default_value = ".cubicle/demo")]
        log_dir: PathBuf,
        /// Put every namespaced example object into this namespace instead.
        #[arg(long)]
        namespace: Option<String>,
        /// Also stop when standard input closes (used by the tests).
        #[arg(long, hide = true)]
        exit_on_stdin_eof: bool,
        /// Create the PriorityClasses and RuntimeClasses the examples refer to and the cluster
        /// lacks. Only for clusters whose nodes run nothing, like `cubicle dev up`'s (where
        /// `dev up --demo` always does it).
        #[arg(long)]
        stub_missing_classes: bool,
        #[command(flatten)]
        demo_args: DemoArgs,
    },
}

#[derive(clap::Args)]
struct DemoArgs {
    /// The kustomize tree the demo applies.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))]
    examples: PathBuf,
    /// The demo operator's /metrics, /healthz and /readyz address (port 0: a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    operator_metrics_addr: std::net::SocketAddr,
    /// Also run a local OpenID Provider (demo people, passwords printed) and the gateway on
    /// http://cubicle.localhost:PORT (browsers resolve *.localhost to this machine).
    #[arg(long)]
    gateway_port: Option<u16>,
}

/// Installed as `kubectl-cubicle` (a copy or a symlink of this binary), it is the kubectl
/// plugin `kubectl cubicle ...`: the same commands, with kubectl's name in help and errors.
fn parse_cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let plugin = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("kubectl-cubicle"));
    let mut cmd = Cli::command();
    if plugin {
        cmd = cmd.name("kubectl-cubicle").bin_name("kubectl cubicle");
    }
    let matches = cmd.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    let cli = parse_cli();
    // The operator's heap in one arena (see `glibc::one_arena`), set before the runtime starts
    // its threads; other commands keep glibc's default.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if matches!(cli.command, Command::Run(_)) {
        glibc::one_arena();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the Tokio runtime starts")
        .block_on(run_command(cli))
}

async fn run_command(cli: Cli) -> ExitCode {
    let format = match &cli.command {
        Command::Run(args) => args.log_format,
        Command::Gateway(args) => args.log_format,
        _ => cubicle::telemetry::LogFormat::Text,
    };
    cubicle::telemetry::init(format);
    match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Gateway(args) => gateway(*args).await,
        Command::Keepalive { session, namespace } => keepalive(&session, namespace).await,
        Command::Launch {
            workspace,
            profile,
            zone,
            wait,
            timeout,
            target,
        } => {
            let profile = profile.and_then(|p| serde_json::from_value(serde_json::json!(p)).ok());
            let req = cubicle::me::LaunchRequest {
                workspace,
                profile,
                zone,
            };
            let wait = wait.then(|| Duration::from_secs(timeout));
            people(target, cubicle::me::Action::Launch { req, wait }).await
        }
        Command::Sessions { target } => people(target, cubicle::me::Action::Sessions).await,
        Command::Stop { session, target } => people(target, set_state(session, "Stopped")).await,
        Command::Pause { session, target } => people(target, set_state(session, "Paused")).await,
        Command::Resume { session, target } => people(target, set_state(session, "Running")).await,
        Command::Delete { session, target } => {
            people(target, cubicle::me::Action::Delete { session }).await
        }
        Command::Bench(args) => cubicle::bench::main(*args).await,
        Command::BenchExpiry(args) => cubicle::bench::expiry::main(*args).await,
        Command::BenchGateway(args) => cubicle::bench::gateway::main(*args).await,
        Command::Dev(DevCommand::Up {
            dir,
            nodes,
            zones,
            timeout,
            exit_on_stdin_eof,
            real_node,
            node_images,
            demo,
            oidc,
            demo_args,
        }) => {
            // The demo's gateway signs people in at the issuer the API server trusts.
            let gateway = demo
                .then_some(demo_args.gateway_port)
                .flatten()
                .map(|p| format!("http://cubicle.localhost:{p}/.cubicle/callback"));
            let oidc = (oidc || gateway.is_some()).then(|| gateway.into_iter().collect());
            let demo = demo.then_some(demo_args);
            let real_node = real_node.then_some(node_images);
            let opts = DevOptions {
                dir: std::path::absolute(&dir).unwrap_or(dir),
                nodes,
                zones,
                timeout: Duration::from_secs(timeout),
                real_node,
                oidc,
            };
            dev_up(opts, exit_on_stdin_eof, demo).await
        }
        Command::Dev(DevCommand::Demo {
            kubeconfig,
            log_dir,
            namespace,
            exit_on_stdin_eof,
            stub_missing_classes,
            demo_args,
        }) => {
            let stub = stub_missing_classes;
            dev_demo(
                kubeconfig,
                log_dir,
                namespace,
                exit_on_stdin_eof,
                stub,
                demo_args,
            )
            .await
        }
        Command::Docs(DocsCommand::KasmTable) => {
            print!("{}", cubicle::docs::kasm_table());
            ExitCode::SUCCESS
        }
        Command::Crds { dir } => crds(dir),
        Command::Validate { dir, strict } => validate(&dir, strict),
        Command::Plan { dir, output, user } => plan(&dir, output, user.as_deref()),
    }
}

async fn dev_up(opts: DevOptions, exit_on_stdin_eof: bool, demo: Option<DemoArgs>) -> ExitCode {
    let dir = opts.dir.clone();
    let cluster = match DevCluster::start(&opts).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cubicle dev up: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let ready_path = dir.join("dev-ready");
    let tmp = dir.join("dev-ready.tmp");
    let body = serde_json::to_string_pretty(&cluster.ready).expect("serializable");
    if let Err(e) = std::fs::write(&tmp, body).and_then(|_| std::fs::rename(&tmp, &ready_path)) {
        eprintln!(
            "cubicle dev up: failed to write {}: {e}",
            ready_path.display()
        );
        cluster.stop().await;
        return ExitCode::FAILURE;
    }
    println!(
        "local control plane ready in {:.1}s ({} nodes in {}): {}\n  export KUBECONFIG={}\n  component logs: {}",
        cluster.ready.startup_ms as f64 / 1000.0,
        cluster.ready.nodes.len(),
        cluster.ready.zones.join(", "),
        cluster.ready.server,
        cluster.ready.kubeconfig.display(),
        cluster.ready.log_dir.display(),
    );
    // Acting as a demo person: the Session admission policy is in force, so each may launch,
    // list and change only their own User's sessions (root is in the admin group).
    let people = cubicle::devenv::people::PEOPLE
        .iter()
        .map(|p| p.short)
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "  demo people ({people}; mallory has no User, root is in {}): a kubeconfig each in {}, e.g.\n    KUBECONFIG={} cubicle sessions -n northwind",
        cubicle::devenv::people::ADMIN_GROUP,
        dir.join("people").display(),
        cubicle::devenv::people::kubeconfig(&dir, "dave").display(),
    );
    if let Some(issuer) = &cluster.issuer {
        println!(
            "  OpenID Provider {} (trusted by the API server as oidc:<identity>; CA {}): people and passwords in {}",
            issuer.url,
            issuer.ca_file.display(),
            cubicle::devenv::oidc::IssuerRecord::path(&dir).display(),
        );
    }
    if let Some(node) = &cluster.ready.real_node {
        println!(
            "  real node {} Ready in {:.1}s (pods on {}; select and tolerate cubicle.dev/real-node=true); logs: {}/logs",
            node.name,
            node.startup_ms as f64 / 1000.0,
            node.subnet,
            node.dir.display()
        );
    }
    if let Some(why) = &cluster.ready.real_node_unavailable {
        eprintln!("cubicle dev up: no real node, the fake nodes carry on; {why}");
    }
    let code = match demo {
        None => {
            interrupted(exit_on_stdin_eof).await;
            ExitCode::SUCCESS
        }
        Some(args) => {
            // The nodes are the fake kubelet: a RuntimeClass handler runs nothing here.
            let mut opts = demo_options(
                cluster.ready.kubeconfig.clone(),
                cluster.ready.log_dir.clone(),
                None,
                true,
                args,
            );
            opts.issuer = cluster.issuer.as_ref().map(|i| i.record());
            match cubicle::devenv::demo::run(&cluster.client, &opts, interrupted(exit_on_stdin_eof))
                .await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cubicle dev up --demo: {}", error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
    };
    eprintln!("stopping the local control plane");
    let _ = std::fs::remove_file(&ready_path);
    match cluster.stop_checked().await {
        Ok(()) => code,
        Err(e) => {
            eprintln!("cubicle dev up: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C, SIGTERM or (if asked) when standard input closes.
async fn interrupted(exit_on_stdin_eof: bool) {
    let stdin_closed = async {
        if exit_on_stdin_eof {
            // A plain thread, not tokio's stdin: a read blocked in tokio's blocking pool would
            // keep the runtime, and so the process, from exiting after a signal.
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                let _ = tx.send(());
            });
            let _ = rx.await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
        _ = stdin_closed => {},
    }
}

fn demo_options(
    kubeconfig: PathBuf,
    log_dir: PathBuf,
    namespace: Option<String>,
    stub_classes: bool,
    args: DemoArgs,
) -> cubicle::devenv::demo::DemoOptions {
    cubicle::devenv::demo::DemoOptions {
        kubeconfig,
        examples: args.examples,
        namespace,
        log_dir,
        metrics_addr: args.operator_metrics_addr,
        operator_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cubicle")),
        stub_classes,
        gateway_port: args.gateway_port,
        issuer: None,
    }
}

async fn dev_demo(
    kubeconfig: Option<PathBuf>,
    log_dir: PathBuf,
    namespace: Option<String>,
    exit_on_stdin_eof: bool,
    stub_classes: bool,
    args: DemoArgs,
) -> ExitCode {
    let kubeconfig = kubeconfig
        .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")));
    let Some(kubeconfig) = kubeconfig else {
        eprintln!("cubicle dev demo: no kubeconfig (--kubeconfig or KUBECONFIG)");
        return ExitCode::FAILURE;
    };
    let client = match cubicle::devenv::client_from_kubeconfig(&kubeconfig).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cubicle dev demo: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let log_dir = std::path::absolute(&log_dir).unwrap_or(log_dir);
    let opts = demo_options(kubeconfig, log_dir, namespace, stub_classes, args);
    match cubicle::devenv::demo::run(&client, &opts, interrupted(exit_on_stdin_eof)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cubicle dev demo: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn crds(dir: Option<PathBuf>) -> ExitCode {
    match dir {
        None => {
            print!("{}", cubicle::crd::render_all_yaml());
            ExitCode::SUCCESS
        }
        Some(dir) => match cubicle::crd::write_dir(&dir) {
            Ok(paths) => {
                for p in paths {
                    eprintln!("wrote {}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cubicle crds: writing {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn run(args: RunArgs) -> ExitCode {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use cubicle::client::ApiBudget;
    use cubicle::controller::{self, OperatorConfig};
    use cubicle::http::{self, HttpState};
    use cubicle::leader::{self, LeaseTimings};
    use cubicle::metrics::Metrics;

    let timings = LeaseTimings {
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
    };
    if let Err(e) = timings.check() {
        eprintln!("cubicle run: {e}");
        return ExitCode::from(2);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    controller::stores::set_memory_release(glibc::release_free_memory);
    let kube_config = match kube::Config::infer().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cubicle run: no Kubernetes configuration (in-cluster or KUBECONFIG): {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(Metrics::default());
    let budget = ApiBudget {
        qps: args.api_qps,
        burst: args.api_burst,
    };
    let client = match cubicle::client::build(kube_config, metrics.api_counter(), budget) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cubicle run: cannot build the Kubernetes client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let identity = args.identity.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "cubicle".into()),
            std::process::id()
        )
    });
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http_state = HttpState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let listener = match tokio::net::TcpListener::bind(args.metrics_addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cubicle run: cannot listen on {}: {e}", args.metrics_addr);
            return ExitCode::FAILURE;
        }
    };
    let http_addr = listener.local_addr().unwrap_or(args.metrics_addr);
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(http::serve(listener, http_state, async move {
        let _ = http_stop.wait_for(|s| *s).await;
    }));
    let election = args.leader_elect.then(|| {
        leader::spawn(
            client.clone(),
            &args.leader_election_namespace,
            &args.lease_name,
            identity.clone(),
            timings,
        )
    });
    let gateway_url = match args
        .public_url
        .as_deref()
        .map(cubicle::gateway::core::PublicUrl::parse)
    {
        None => None,
        Some(Ok(u)) => Some(u),
        Some(Err(e)) => {
            eprintln!("cubicle run: --public-url: {e}");
            return ExitCode::from(2);
        }
    };
    let credentials = if args.session_credentials {
        match cubicle::credentials::ensure(
            client.clone(),
            &args.leader_election_namespace,
            &args.key_secret,
        )
        .await
        {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("cubicle run: session credentials: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let config = OperatorConfig {
        namespaces: args.namespaces.clone(),
        concurrency: args.concurrency,
        resync: args.resync,
        identity,
        credentials,
        gateway_url,
    };
    let shutdown = async {
        interrupted(args.exit_on_stdin_eof).await;
        tracing::info!("shutdown requested");
    };
    tracing::info!(namespaces = ?args.namespaces, metrics = %http_addr, leader_elect = args.leader_elect, "starting");
    let result = controller::run(
        client,
        config,
        metrics,
        controller::ALL,
        ready,
        election.as_ref().map(|e| e.leadership.clone()),
        shutdown,
    )
    .await;
    // The controllers have stopped: only now may a leader hand the lease over.
    if let Some(e) = election {
        e.step_down().await;
    }
    let _ = stop_tx.send(true);
    let _ = http_task.await;
    tracing::info!(ok = result.is_ok(), "stopped");
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "operator stopped");
            ExitCode::FAILURE
        }
    }
}

async fn gateway(args: GatewayArgs) -> ExitCode {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use cubicle::gateway::{self, AuthMode, GatewayConfig, core::PublicUrl};

    let public = match PublicUrl::parse(&args.public_url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("cubicle gateway: --public-url: {e}");
            return ExitCode::from(2);
        }
    };
    let header = |flag: &str, v: &str| {
        http::HeaderName::from_bytes(v.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("cubicle gateway: {flag}: {v:?} is not a header name"))
    };
    let auth = match (&args.trusted_user_header, &args.oidc_issuer) {
        (Some(_), Some(_)) => {
            eprintln!(
                "cubicle gateway: --trusted-user-header and --oidc-issuer exclude each other"
            );
            return ExitCode::from(2);
        }
        (None, Some(issuer)) => {
            let Some(secret) = args.oidc_client_secret.clone() else {
                eprintln!(
                    "cubicle gateway: --oidc-issuer needs --oidc-client-secret (or CUBICLE_OIDC_CLIENT_SECRET)"
                );
                return ExitCode::from(2);
            };
            if !["sub", "email", "preferred_username"].contains(&args.oidc_username_claim.as_str())
            {
                eprintln!(
                    "cubicle gateway: --oidc-username-claim {:?}: expected sub, email or preferred_username",
                    args.oidc_username_claim
                );
                return ExitCode::from(2);
            }
            match gateway::oidc::Oidc::new(gateway::oidc::OidcSettings {
                issuer: issuer.clone(),
                client_id: args.oidc_client_id.clone(),
                client_secret: secret,
                username_claim: args.oidc_username_claim.clone(),
                ca_file: args.oidc_ca_file.clone(),
                groups_claim: Some(args.oidc_groups_claim.clone()).filter(|c| !c.is_empty()),
            }) {
                Ok(o) => AuthMode::Oidc(Arc::new(o)),
                Err(e) => {
                    eprintln!("cubicle gateway: --oidc-ca-file: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        (Some(u), None) => {
            let user = match header("--trusted-user-header", u) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let groups = match args
                .trusted_groups_header
                .as_deref()
                .map(|g| header("--trusted-groups-header", g))
            {
                None => None,
                Some(Ok(h)) => Some(h),
                Some(Err(e)) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            AuthMode::TrustedHeader { user, groups }
        }
        (None, None) => {
            eprintln!(
                "cubicle gateway: no way to identify people: set --oidc-issuer or --trusted-user-header"
            );
            return ExitCode::from(2);
        }
    };
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "cubicle gateway: no Kubernetes configuration (in-cluster or KUBECONFIG): {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    let key_secret = args.key_secret.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into()),
            cubicle::credentials::DEFAULT_KEY_SECRET
        )
    });
    let Some((key_ns, key_name)) = key_secret.split_once('/') else {
        eprintln!("cubicle gateway: --key-secret {key_secret:?}: expected namespace/name");
        return ExitCode::from(2);
    };
    // The operator creates the key: wait for it.
    let key = loop {
        match cubicle::credentials::load(client.clone(), key_ns, key_name).await {
            Ok(k) => break k,
            Err(e) => {
                tracing::warn!(error = %e, "waiting for the master key");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cubicle gateway: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let config = GatewayConfig {
        public,
        namespaces: args.namespaces.clone(),
        auth,
        username_prefix: args.username_prefix.clone(),
        groups_prefix: args.groups_prefix.clone(),
        key,
    };
    let gw = gateway::start(client, config, listener);
    let ready = Arc::new(AtomicBool::new(false));
    let http_state = cubicle::http::HttpState {
        metrics: Arc::new(cubicle::metrics::Metrics::default()),
        ready: ready.clone(),
    };
    let metrics_listener = match tokio::net::TcpListener::bind(args.metrics_addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "cubicle gateway: cannot listen on {}: {e}",
                args.metrics_addr
            );
            return ExitCode::FAILURE;
        }
    };
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let http_task = tokio::spawn(cubicle::http::serve(
        metrics_listener,
        http_state,
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));
    let readiness = {
        let state = gw.state.clone();
        tokio::spawn(async move {
            while !state.cache.synced() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            ready.store(true, Ordering::Release);
        })
    };
    interrupted(args.exit_on_stdin_eof).await;
    readiness.abort();
    drop(gw);
    let _ = stop_tx.send(true);
    let _ = http_task.await;
    ExitCode::SUCCESS
}

fn validate(dir: &std::path::Path, strict: bool) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let code = cubicle::plan::validate(dir, strict, &mut out, &mut std::io::stderr());
    drop(out);
    ExitCode::from(code)
}

fn plan(dir: &std::path::Path, output: cubicle::plan::Format, user: Option<&str>) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let code = cubicle::plan::plan(dir, output, user, &mut out, &mut std::io::stderr());
    drop(out);
    ExitCode::from(code)
}

fn set_state(session: String, state: &str) -> cubicle::me::Action {
    cubicle::me::Action::SetState {
        session,
        state: serde_json::from_value(serde_json::json!(state)).expect("a desired state"),
    }
}

/// Runs a people command: one line on stderr and exit 1 for anything refused or wrong.
async fn people(target: PeopleTarget, action: cubicle::me::Action) -> ExitCode {
    let client = match &target.kubeconfig {
        Some(p) => cubicle::devenv::client_from_kubeconfig(p)
            .await
            .map_err(|e| e.to_string()),
        None => kube::Client::try_default().await.map_err(|e| e.to_string()),
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cubicle: no Kubernetes configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ns = target
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_string());
    match cubicle::me::run(client, &ns, action).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(line) => {
            eprintln!("cubicle: {line}");
            ExitCode::FAILURE
        }
    }
}

async fn keepalive(session: &str, namespace: Option<String>) -> ExitCode {
    use cubicle::crd::v1alpha1::{KEEPALIVE_ANNOTATION, Session};
    use kube::api::{Api, Patch, PatchParams};
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cubicle keepalive: no Kubernetes configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<Session> = Api::namespaced(client, &ns);
    let now = jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {KEEPALIVE_ANNOTATION: now}}});
    match api
        .patch(session, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {
            println!("{ns}/{session}: keepalive {now}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cubicle keepalive: Session {ns}/{session}: {e}");
            ExitCode::FAILURE
        }
    }
}
