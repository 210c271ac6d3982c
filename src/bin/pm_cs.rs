//! `pm_cs`: the procman daemon and its command line. Parses arguments and delegates to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pm_cs", version, about = "CGSE Process Manager control server (procman)")]
struct Cli {
    /// Local settings file merged over the defaults (instead of the one named by <PROJECT>_LOCAL_SETTINGS).
    #[arg(long, global = true, value_name = "FILE")]
    settings: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control server in the foreground until SIGINT, SIGTERM or quit_server.
    Start,
    /// Report whether the Process Manager is active, and its ports.
    Status,
    /// Ask a running Process Manager to quit.
    Stop,
    /// Inspect pickled frames (a debugging aid; nothing is imported or executed).
    #[command(hide = true)]
    Pickle {
        #[command(subcommand)]
        action: PickleAction,
    },
}

#[derive(Subcommand)]
enum PickleAction {
    /// Print the decoded structure of a pickle file.
    Show { file: PathBuf },
    /// Decode a pickle file and write it back with our encoder.
    Reencode { input: PathBuf, output: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pm_cs: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Start => procman::cli::start(cli.settings.as_deref()).await,
            Command::Status => procman::cli::status(cli.settings.as_deref()).await,
            Command::Stop => procman::cli::stop(cli.settings.as_deref()).await,
            Command::Pickle {
                action: PickleAction::Show { file },
            } => procman::cli::pickle_show(&file),
            Command::Pickle {
                action: PickleAction::Reencode { input, output },
            } => procman::cli::pickle_reencode(&input, &output),
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("pm_cs: {e}");
            ExitCode::FAILURE
        }
    }
}
