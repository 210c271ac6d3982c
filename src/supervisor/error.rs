//! Typed errors of the supervisor and of the definition table.

use std::io;
use std::path::PathBuf;

/// An error in a process definition or in the process table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    /// The table file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The table file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The YAML is malformed or does not fit the schema (the message carries line, column and key).
    #[error("{origin}: {message}")]
    Syntax {
        /// The file name, or `<input>`.
        origin: String,
        /// The parser's rendered message.
        message: String,
    },
    /// A value is out of range or inconsistent; `key` is the dotted path inside the table.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// The file name, or `<definition>` for definitions built in code.
        origin: String,
        /// Dotted key path, e.g. `devices.DUMMY_01.stop_timeout`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Neither a `devices` entry nor a `device_classes` entry matches the device.
    #[error(
        "no definition for device {device_id} (class {device_class}): \
         add it under `devices` or `device_classes` in the process table"
    )]
    NoDefinition {
        /// The Setup's device id.
        device_id: String,
        /// The device class path (without `class//`).
        device_class: String,
    },
    /// A client-supplied `cgse_cmd` was refused.
    #[error(transparent)]
    Command(#[from] ClientCommandError),
}

/// Why a client-supplied command string (`StartCommand.cgse_cmd`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientCommandError {
    /// Nothing but whitespace.
    #[error("empty command")]
    Empty,
    /// The string contains a character a shell would interpret; no shell is run, so it is refused outright.
    #[error("refused command {command:?}: it contains the shell metacharacter {character:?}")]
    Metacharacter {
        /// The refused string.
        command: String,
        /// The first offending character.
        character: char,
    },
    /// The sub-command is not a device launcher a client may run.
    #[error("refused command {command:?}: a client may only name a device launcher `cgse <name>`; permitted names ({source_}): [{}]", permitted.join(", "))]
    NotALauncher {
        /// The refused string.
        command: String,
        /// The permitted launcher names.
        permitted: Vec<String>,
        /// Where the list came from.
        source_: String,
    },
    /// A device id or argument is not a plain token.
    #[error("refused argument {argument:?}: device ids and arguments must be 1-128 characters of A-Z a-z 0-9 _ - . : @ + , and not start with '-'")]
    BadArgument {
        /// The refused argument (truncated).
        argument: String,
    },
    /// Too many device arguments.
    #[error("refused: {count} device arguments, at most {max}")]
    TooManyArguments {
        /// How many were sent.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The launcher program cannot be found safely.
    #[error("cannot run {program:?}: {message}")]
    NotFound {
        /// The program name.
        program: String,
        /// Why.
        message: String,
    },
    /// The program is not on the allow-list.
    #[error("refused command {command:?}: program {program:?} is not allowed (allowed programs: {})", allowed.join(", "))]
    NotAllowed {
        /// The refused string.
        command: String,
        /// Its first word.
        program: String,
        /// The configured allow-list.
        allowed: Vec<String>,
    },
}

/// An error returned by the supervisor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// No process with this id is defined.
    #[error("unknown process {0:?}")]
    UnknownProcess(String),
    /// A definition was refused.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// Two definitions in one call share an id, or two ids map to the same log file name.
    #[error("duplicate process id or log name: {0:?}")]
    Duplicate(String),
    /// A file or directory operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// Becoming a child subreaper or starting the reaper failed.
    #[error("cannot install the child reaper: {0}")]
    Reaper(#[from] ReaperError),
    /// `Supervisor::spawn` was called outside a tokio runtime.
    #[error("the supervisor must be started inside a tokio runtime")]
    NoRuntime,
    /// A limit was reached (e.g. the number of client-created definitions).
    #[error("limit reached: {0}")]
    Limit(String),
    /// A helper process failed (e.g. listing the configured Python's entry points).
    #[error("helper {program}: {message}")]
    Helper {
        /// The helper program.
        program: String,
        /// What went wrong.
        message: String,
    },
    /// The supervisor is shutting down or its task is gone.
    #[error("the supervisor is shut down")]
    Closed,
}

impl SupervisorError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        SupervisorError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Why the process-wide reaper could not be installed (kept for every later caller, hence `Clone`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReaperError {
    /// `prctl(PR_SET_CHILD_SUBREAPER)` failed.
    #[error("PR_SET_CHILD_SUBREAPER: {0}")]
    Subreaper(nix::errno::Errno),
    /// The reaper thread's runtime could not be built.
    #[error("reaper runtime: {0}")]
    Runtime(std::sync::Arc<io::Error>),
    /// The SIGCHLD handler could not be installed.
    #[error("SIGCHLD handler: {0}")]
    Handler(std::sync::Arc<io::Error>),
    /// The thread could not be spawned.
    #[error("reaper thread: {0}")]
    Thread(std::sync::Arc<io::Error>),
    /// The thread ended before it said it was ready.
    #[error("reaper thread died before it was ready")]
    Died,
}
