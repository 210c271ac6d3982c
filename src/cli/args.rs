//! The arguments of every face of the CLI, and what each command runs.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use super::{ops, CliError, Flavour};
use crate::daemon::DaemonConfig;

/// The parsed command line.
#[derive(Parser, Debug)]
#[command(name = "pm_cs", version, about = "CGSE Process Manager control server (procman)", long_about = None)]
pub struct Cli {
    /// Local settings file merged over the defaults (instead of the one named by <PROJECT>_LOCAL_SETTINGS).
    #[arg(long, global = true, value_name = "FILE")]
    pub settings: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum Command {
    /// Run the control server in the foreground until SIGINT, SIGTERM or quit_server.
    Start,
    /// Start the control server in the background (its output in <log location>/pm_cs.start-bg.log).
    StartBg,
    /// Report whether the Process Manager is active, and its ports.
    Status,
    /// Ask a running Process Manager to quit; with --all, stop every managed process first.
    Stop {
        /// Stop every managed process (reverse start order, with progress), then the daemon.
        #[arg(long)]
        all: bool,
    },
    /// List the managed processes: id, state, pid, uptime, restarts, ready, CPU %, RSS.
    Ps {
        /// One JSON document (shape in the README) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print the last lines of a process's output (stdout and stderr).
    Logs {
        /// How many lines.
        #[arg(short = 'n', long = "lines", default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=100_000))]
        lines: u32,
        /// Keep printing new lines until Ctrl-C.
        #[arg(short, long)]
        follow: bool,
        /// The process id.
        #[arg(help = None)]
        id: String,
    },
    /// Start a managed process.
    StartProcess {
        /// The process id.
        #[arg(help = None)]
        id: String,
    },
    /// Stop a managed process.
    StopProcess {
        /// The process id.
        #[arg(help = None)]
        id: String,
    },
    /// Restart a managed process.
    Restart {
        /// The process id.
        #[arg(help = None)]
        id: String,
    },
    /// Re-read the process definitions and the Setup; print what changed.
    Reload {
        /// Print what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Follow process state changes (one line each) until Ctrl-C.
    Events,
    /// Inspect pickled frames (a debugging aid; nothing is imported or executed).
    #[command(hide = true)]
    Pickle {
        /// What to do with the pickle.
        #[command(subcommand)]
        action: PickleAction,
    },
}

/// The subcommands of `pickle`.
#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum PickleAction {
    /// Print the decoded structure of a pickle file.
    Show {
        /// The pickle file.
        #[arg(help = None)]
        file: PathBuf,
    },
    /// Decode a pickle file and write it back with our encoder.
    Reencode {
        /// The pickle file to read.
        #[arg(help = None)]
        input: PathBuf,
        /// Where to write the re-encoded pickle.
        #[arg(help = None)]
        output: PathBuf,
    },
}

/// Parse `argv` (its first item is the program name shown in usage, e.g. `pm_cs` or `cgse procman`). On
/// `--help`, `--version` or a usage error the text is printed here and the exit code returned (0 or 2).
pub fn parse<I, T>(argv: I) -> Result<Cli, u8>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let name = argv
        .first()
        .and_then(|a| a.to_str())
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_owned())
        .unwrap_or_else(|| "pm_cs".to_owned());
    let matches = Cli::command().bin_name(name).try_get_matches_from(argv);
    match matches.and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => Ok(cli),
        Err(e) => {
            let _ = e.print();
            Err(if e.use_stderr() { 2 } else { 0 })
        }
    }
}

impl Command {
    /// True for the commands that run until Ctrl-C by design (the caller ends them with exit code 130).
    pub fn follows(&self) -> bool {
        matches!(self, Command::Events | Command::Logs { follow: true, .. })
    }
}

/// Run a parsed command. `start` and `start-bg` belong to the binary and the Python module (each starts
/// the daemon its own way), so they are refused here.
pub async fn run(cli: &Cli, flavour: Flavour) -> Result<u8, CliError> {
    if let Command::Pickle { action } = &cli.command {
        return match action {
            PickleAction::Show { file } => super::pickle_show(file),
            PickleAction::Reencode { input, output } => super::pickle_reencode(input, output),
        };
    }
    let config = DaemonConfig::load(cli.settings.as_deref())?;
    match &cli.command {
        Command::Start | Command::StartBg | Command::Pickle { .. } => {
            Err(CliError::Other("start and start-bg are run by the caller".into()))
        }
        Command::Status => super::status(&config, flavour).await,
        Command::Stop { all: false } => super::stop(&config, flavour).await,
        Command::Stop { all: true } => ops::stop_all(&config).await,
        Command::Ps { json } => ops::ps(&config, *json).await,
        Command::Logs { lines, follow, id } => ops::logs(&config, id, *lines as usize, *follow).await,
        Command::StartProcess { id } => ops::process_action(&config, "start", id).await,
        Command::StopProcess { id } => ops::process_action(&config, "stop", id).await,
        Command::Restart { id } => ops::process_action(&config, "restart", id).await,
        Command::Reload { dry_run } => ops::reload(&config, *dry_run).await,
        Command::Events => ops::events(&config).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        let p = |a: &[&str]| parse(a.iter().copied()).map(|c| c.command);
        assert_eq!(p(&["pm_cs", "ps", "--json"]), Ok(Command::Ps { json: true }));
        assert_eq!(
            p(&["pm_cs", "logs", "-n", "5", "-f", "x"]),
            Ok(Command::Logs {
                lines: 5,
                follow: true,
                id: "x".into()
            })
        );
        assert_eq!(p(&["pm_cs", "stop", "--all"]), Ok(Command::Stop { all: true }));
        assert_eq!(p(&["pm_cs", "stop"]), Ok(Command::Stop { all: false }));
        assert_eq!(
            p(&["pm_cs", "reload", "--dry-run"]),
            Ok(Command::Reload { dry_run: true })
        );
        assert_eq!(p(&["pm_cs", "restart", "a"]), Ok(Command::Restart { id: "a".into() }));
        assert_eq!(p(&["pm_cs", "start-bg"]), Ok(Command::StartBg));
        assert_eq!(p(&["pm_cs", "bogus"]), Err(2));
        assert_eq!(p(&["pm_cs", "logs"]), Err(2), "the id is required");
        assert_eq!(p(&["pm_cs", "logs", "-n", "-1", "x"]), Err(2));
        assert!(p(&["pm_cs", "events"]).unwrap().follows());
        assert!(!p(&["pm_cs", "logs", "x"]).unwrap().follows());
    }
}
