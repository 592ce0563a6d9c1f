//! The `chatcli` binary: parses the command line and wires the library together. The daemon writes
//! to stdout only for `config show` and `--version`; everything else goes to the log (stderr).

use std::io::Write as _;
use std::process::ExitCode;

use chatcli::cli::{Cli, Command, ConfigCommand, ServerArgs, normalize_args};
use chatcli::config::{self, LoadError, Loaded, Sources};
use chatcli::exit;
use chatcli::server::{self, Listeners};
use chatcli::telemetry::{LogSettings, LoggingError, init_logging};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: a proxied call makes dozens of short-lived allocations
/// (headers, JSON, buffers), and glibc's malloc (musl's even more, in the static image) was a fifth
/// of the daemon's CPU time per call in the benchmark profile (bench/HISTORY.md). [`chatcli::alloc`]
/// asks it for plain blocks where the alignment allows.
#[global_allocator]
static ALLOC: chatcli::alloc::Allocator = chatcli::alloc::Allocator;

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(normalize_args(std::env::args_os())) {
        Ok(cli) => cli,
        Err(e) => {
            // Every subcommand, `connect` included, exits 64 (EX_USAGE) on a bad command line.
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    exit::OK
                }
                _ => exit::USAGE,
            };
            let _ = e.print();
            if code != exit::OK {
                chatcli::client::report_usage_error(&e.to_string());
            }
            return code_of(code);
        }
    };
    code_of(match cli.command {
        Command::Server(args) => serve(args),
        Command::Config(ConfigCommand::Check(args)) => config_check(args),
        Command::Config(ConfigCommand::Show(args)) => config_show(args),
        Command::Config(ConfigCommand::Example) => config_example(),
        Command::Healthcheck(args) => healthcheck(&args),
        Command::Connect(args) => chatcli::client::run(args),
    })
}

fn code_of(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Loads and validates the config, and checks that every provider can be built from it.
fn load(args: &ServerArgs) -> Result<Loaded, i32> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sources = Sources::from_process(args.config.clone(), args.flag_values());
    let loaded = config::load(&sources).map_err(|e| report_config_errors(&e))?;
    if let Err(errors) = server::preflight(&loaded.config) {
        let problems = errors
            .iter()
            .map(|e| match e.setting.as_str() {
                "" => config::Problem::new("", "config", &e.reason),
                // A provider that cannot be built: the reason names it.
                key if e.reason.starts_with("provider `") => {
                    config::Problem::new(key, "config", &e.reason)
                }
                key => config::Problem::new(key, &config::origin(&loaded.figment, key), &e.reason),
            })
            .collect();
        return Err(report_config_errors(&LoadError {
            problems,
            warnings: loaded.warnings,
        }));
    }
    Ok(loaded)
}

/// Before logging is set up, problems go to stderr as plain lines: one per problem.
fn report_config_errors(e: &LoadError) -> i32 {
    for w in &e.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!("configuration has {} problem(s):", e.problems.len());
    for p in &e.problems {
        eprintln!("  - {p}");
    }
    exit::CONFIG
}

fn config_check(args: ServerArgs) -> i32 {
    match load(&args) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            let file = loaded
                .file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_else(|| "no config file".into());
            eprintln!("configuration OK ({file})");
            exit::OK
        }
        Err(code) => code,
    }
}

fn config_show(args: ServerArgs) -> i32 {
    let loaded = match load(&args) {
        Ok(l) => l,
        Err(code) => return code,
    };
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    match config::render_show(&loaded) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            if out
                .write_all(text.as_bytes())
                .and_then(|_| out.flush())
                .is_err()
            {
                return exit::SOFTWARE;
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("cannot render the configuration: {e}");
            exit::SOFTWARE
        }
    }
}

fn healthcheck(args: &chatcli::cli::HealthcheckArgs) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("healthcheck: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(server::healthcheck::probe(args)) {
        Ok(addr) => {
            eprintln!("healthcheck: {addr} is SERVING");
            0
        }
        Err(why) => {
            eprintln!("healthcheck: {why}");
            1
        }
    }
}

fn config_example() -> i32 {
    let mut out = std::io::stdout().lock();
    match out
        .write_all(config::example::render().as_bytes())
        .and_then(|_| out.flush())
    {
        Ok(()) => exit::OK,
        Err(_) => exit::SOFTWARE,
    }
}

fn serve(args: ServerArgs) -> i32 {
    let loaded = match load(&args) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let c = &loaded.config;
    // The log file and the audit log are opened before any port is bound: a path that cannot be
    // written stops the daemon (73, EX_CANTCREAT) before it takes a port or a connection.
    let log_guard = match init_logging(&LogSettings {
        level: c.log.level.clone(),
        format: c.log.format,
        file: c.log.file.clone(),
        max_size_mb: c.log.max_size_mb,
        max_backups: c.log.max_backups,
        max_age_days: c.log.max_age_days,
        compress: c.log.compress,
    }) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cannot set up logging: {e}");
            return match e {
                LoggingError::InvalidPath { .. }
                | LoggingError::CreateDir { .. }
                | LoggingError::OpenFile { .. } => exit::CANTCREAT,
                _ => exit::CONFIG,
            };
        }
    };
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    match &loaded.file {
        Some(f) => {
            tracing::info!(config = %f.display(), version = chatcli::VERSION, "starting chatcli server")
        }
        None => tracing::info!(
            version = chatcli::VERSION,
            "starting chatcli server without a config file"
        ),
    }
    tracing::info!("config loaded from {}", loaded.sources_line());
    if c.llm.providers.is_empty() {
        tracing::warn!(
            "no LLM provider is configured: prompts will fail; add [[llm.providers]] (try config/demo.toml)"
        );
    }
    let audit = match server::audit::AuditLog::open(&c.audit, None) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("cannot open the audit log: {e}");
            return exit::CANTCREAT;
        }
    };
    match c.auth_methods() {
        methods if methods.is_empty() => tracing::warn!(
            "no authentication is configured: every caller is admin (set a token with --token or CHATCLI_SERVER_TOKEN, [[auth.tokens]], [auth.jwt] keys or a client CA)"
        ),
        methods => tracing::info!("authentication: {}", methods.join(", ")),
    }
    // One worker per CPU the process may run on. With a single CPU (pinned with taskset or a
    // cpuset) work stealing has no one to steal from, so the daemon runs on one thread instead,
    // without the scheduler's cross-thread bookkeeping.
    let single_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let built = match single_cpu {
        true => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        false => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match built {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return exit::SOFTWARE;
        }
    };
    tracing::debug!(single_cpu, "async runtime started");
    runtime.block_on(async move {
        let listeners = match Listeners::bind(&loaded.config).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}");
                return exit::UNAVAILABLE;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone()));
        let log_guard = std::sync::Arc::new(log_guard);
        let options = server::RunOptions {
            reload: Some(Sources::from_process(
                args.config.clone(),
                args.flag_values(),
            )),
            set_log_level: Some(std::sync::Arc::new({
                let g = log_guard.clone();
                move |level: &str| g.set_level(level)
            })),
            audit,
        };
        match server::run_with(listeners, loaded.config, shutdown, options).await {
            Ok(()) => exit::OK,
            Err(e @ server::ServerError::Config(_)) => {
                tracing::error!("{e}");
                exit::CONFIG
            }
            Err(e @ server::ServerError::CannotCreate(_)) => {
                tracing::error!("{e}");
                exit::CANTCREAT
            }
            Err(e) => {
                tracing::error!("{e}");
                exit::SOFTWARE
            }
        }
    })
}

/// First SIGTERM or SIGINT starts the drain; a second one exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = name,
        "shutting down; a second signal exits at once"
    );
    shutdown.cancel();
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::warn!(signal = name, "second signal: exiting now");
    std::process::exit(exit::SOFTWARE);
}
