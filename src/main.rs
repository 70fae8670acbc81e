//! The `switchyard` command: parses flags, sets up logging and the runtime, calls the library.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard::{Config, Server};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A layer 4 and layer 7 load balancer.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer with a configuration file.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Reload the configuration when its file changes.
        #[arg(long)]
        watch: bool,
        /// Offer this process's listening sockets on this Unix socket, for a binary upgrade:
        /// a new process started with `--upgrade-from` the same path takes them, and this one
        /// then drains and exits.
        #[arg(long, value_name = "PATH")]
        upgrade_socket: Option<PathBuf>,
        /// Take the listening sockets of the process offering them at this Unix socket, then
        /// tell it to drain: an upgrade without refusing a connection.
        #[arg(long, value_name = "PATH")]
        upgrade_from: Option<PathBuf>,
    },
    /// Validate a configuration file: exit 0 if it is good, else print every problem and exit 1.
    Check {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start built-in demo backends and listeners, and print what to try.
    Demo {
        /// Log level.
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Listen on free ports instead of trying 8080, 7000 and 7001 first.
        #[arg(long)]
        any_port: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell) to stdout.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            threads,
            log_level,
            watch,
            upgrade_socket,
            upgrade_from,
        } => report(run(
            &config,
            threads,
            &log_level,
            watch,
            Upgrade {
                offer: upgrade_socket,
                from: upgrade_from,
            },
        )),
        Command::Demo {
            log_level,
            any_port,
        } => report(demo(&log_level, any_port)),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "switchyard", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("switchyard: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            // What a start would refuse beyond the values (certificates, keys and CAs that
            // cannot be used, access logs that cannot be opened) is found as a start finds it.
            let found = switchyard::server::preflight(&config);
            for problem in found.problems.iter().chain(&found.warnings) {
                eprintln!("{}", located(path, problem));
            }
            if !found.problems.is_empty() {
                return ExitCode::FAILURE;
            }
            println!(
                "{}: ok ({} listeners, {} pools)",
                path.display(),
                config.listeners.len(),
                config.pools.len()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// A problem as `check` prints it: `FILE: KEY.PATH: reason`, or `FILE: reason` for one that
/// no key is to blame for.
fn located(file: &std::path::Path, problem: &switchyard::config::Problem) -> String {
    if problem.path.is_empty() {
        format!("{}: {}", file.display(), problem.reason)
    } else {
        format!("{}: {}: {}", file.display(), problem.path, problem.reason)
    }
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => tracing_subscriber::EnvFilter::new(env),
        _ => quiet_peers(
            tracing_subscriber::EnvFilter::try_new(level)
                .with_context(|| format!("--log-level `{level}`"))?,
            level,
        ),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A line that cannot be written (standard error's reader gone: a closed pipe, a
        // restarted journal) is lost, and nothing else: the default reports the failure with
        // `eprintln!`, which panics on that same broken stream, in whatever task was logging,
        // the signal handler included.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

/// The TLS library warns about what a peer sent (an IP address as the server name, as `wrk`
/// and some health checkers send it; a warning alert; a message out of order): one line per
/// handshake, at a rate any client chooses. Those are per-connection events, which this
/// process logs at `debug` only, so below `debug` the library's lines are kept to errors,
/// unless `--log-level` names the library itself (`RUST_LOG` is always taken as written).
fn quiet_peers(
    filter: tracing_subscriber::EnvFilter,
    level: &str,
) -> tracing_subscriber::EnvFilter {
    let detailed = filter
        .max_level_hint()
        .is_some_and(|hint| hint >= tracing_subscriber::filter::LevelFilter::DEBUG);
    if detailed || level.contains("rustls") {
        return filter;
    }
    match "rustls=error".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        // One thread: no work stealing to pay for, and no cross-thread wake-ups.
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build().context("starting the runtime")
}

/// The binary-upgrade flags of `run`.
struct Upgrade {
    /// Where to offer this process's sockets.
    offer: Option<PathBuf>,
    /// Where to take an old process's sockets from.
    from: Option<PathBuf>,
}

fn run(
    path: &std::path::Path,
    threads: Option<usize>,
    log_level: &str,
    watch: bool,
    upgrade: Upgrade,
) -> anyhow::Result<()> {
    init_logging(log_level)?;
    prepare_process();
    // Readiness, reloads and the drain are reported to systemd when it started us.
    match switchyard::notify::init_from_env() {
        Ok(true) => info!("notifying the service manager"),
        Ok(false) => {}
        Err(error) => warn!(%error, "not notifying the service manager"),
    }
    let path = path.to_path_buf();
    let path_for_reload = path.clone();
    let path_for_watch = path.clone();
    let runtime = runtime(threads)?;
    let result = runtime.block_on(async {
        // Signals are handled from the start: loading may wait on DNS, and a SIGTERM then
        // should end the process cleanly, not by the default action.
        let shutdown = CancellationToken::new();
        stop_on_signals(shutdown.clone())?;
        // SIGHUP and SIGUSR1 too, so that one arriving while the file loads (or while an
        // upgrade takes its sockets) is kept for later rather than ending the process.
        let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let usr1 =
            signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
        // Watching starts before the file is read, so that a change made while it loads is
        // not missed.
        let watcher = watch
            .then(|| switchyard::watch::Watcher::new(&path_for_watch))
            .transpose()?;
        // On a thread of its own that ends with the load, rather than the runtime's blocking
        // pool, whose idle thread would linger beside a single-threaded runtime.
        let (loaded, load) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("config-load".into())
            .spawn(move || {
                let _ = loaded.send(Config::load(&path));
            })
            .context("starting the configuration loader")?;
        let config = tokio::select! {
            loaded = load => loaded.context("loading the configuration")?.map_err(|e| anyhow::anyhow!("{e}"))?,
            _ = shutdown.cancelled() => {
                info!("stopped while loading the configuration");
                return Ok(());
            }
        };
        let mut inherited = match upgrade.from {
            None => None,
            Some(from) => Some(
                tokio::task::spawn_blocking(move || switchyard::upgrade::Inherited::receive(&from))
                    .await
                    .context("taking over the sockets")?
                    .context("taking over the sockets of the old process")?,
            ),
        };
        // Said as `check` says it: the file, then the key to blame.
        let server = Server::bind_inheriting(
            config,
            Some(path_for_reload.clone()),
            shutdown.clone(),
            inherited.as_mut(),
        )
        .map_err(|error| {
            let lines: Vec<String> = error
                .problems()
                .iter()
                .map(|problem| located(&path_for_reload, problem))
                .collect();
            anyhow::anyhow!("{}", lines.join("\n"))
        })?;
        // Every listener is listening now (connections queue until the accept loops start):
        // the old process may stop accepting.
        // A shutdown asked for meanwhile: the old process goes on serving.
        if let Some(inherited) = inherited.filter(|_| !shutdown.is_cancelled()) {
            inherited
                .ready()
                .context("telling the old process to drain")?;
        }
        if let Some(offer) = upgrade.offer {
            let handle = server.handle();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                match switchyard::upgrade::offer(offer, handle).await {
                    Ok(()) => shutdown.cancel(),
                    Err(error) => warn!(%error, "the upgrade socket failed; no upgrade possible"),
                }
            });
        }
        reload_on_sighup(server.handle(), hup);
        reopen_logs_on_sigusr1(server.handle(), usr1);
        if let Some(watcher) = watcher {
            tokio::spawn(watcher.run(server.handle()));
        }
        info!(version = env!("CARGO_PKG_VERSION"), "switchyard started");
        let cut = server.run().await;
        info!(cut_off = cut, "switchyard stopped");
        Ok(())
    });
    // Everything is done; a blocking task still running (an upgrade hand-over waiting for a new
    // process that went quiet) must not hold the exit for its own timeout.
    runtime.shutdown_background();
    result
}

fn demo(log_level: &str, any_port: bool) -> anyhow::Result<()> {
    init_logging(log_level)?;
    prepare_process();
    runtime(None)?.block_on(async {
        let (server, help) = switchyard::demo::start(any_port).await?;
        stop_on_signals(server.shutdown_token())?;
        // Not `println!`: with standard output closed (`demo | head -3`) it would panic.
        let _ = writeln!(std::io::stdout(), "{help}");
        server.run().await;
        Ok(())
    })
}

/// Process-wide settings a proxy needs before it starts: the allocator's thresholds and the
/// open file limit.
fn prepare_process() {
    switchyard::sys::tune_allocator();
    match switchyard::sys::raise_fd_limit() {
        Ok(limit) => info!(limit, "open file limit"),
        Err(error) => warn!(%error, "could not raise the open file limit"),
    }
}

/// SIGHUP reloads the configuration file. A SIGHUP that arrives during a reload is kept and
/// starts another one after it; a failed reload is logged and changes nothing.
fn reload_on_sighup(
    handle: switchyard::server::ServerHandle,
    mut hup: tokio::signal::unix::Signal,
) {
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!("SIGHUP received: reloading the configuration");
            // The outcome is logged by the reload itself.
            let _ = handle.reload_file().await;
        }
    });
}

/// SIGUSR1 reopens access log files (after logrotate moved them).
fn reopen_logs_on_sigusr1(
    handle: switchyard::server::ServerHandle,
    mut usr1: tokio::signal::unix::Signal,
) {
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            info!("SIGUSR1 received: reopening access logs");
            handle.reopen_logs();
        }
    });
}

/// The first SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once.
fn stop_on_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal: exiting without waiting for connections");
        std::process::exit(1);
    });
    Ok(())
}
