//! `pm_cs`: the procman daemon and its command line. Parses arguments and delegates to the library
//! (`procman::cli`), which the Python CLI shares.

use std::process::ExitCode;

use procman::cli::{self, Command, Flavour};

fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args_os()) {
        Ok(c) => c,
        Err(code) => return ExitCode::from(code),
    };
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
        match &cli.command {
            Command::Start => cli::start(cli.settings.as_deref()).await,
            Command::StartBg => cli::start_bg(cli.settings.as_deref()).await,
            // Every other command ends on Ctrl-C with 130, as shells expect.
            _ => tokio::select! {
                r = cli::run(&cli, Flavour::Rust) => r,
                _ = tokio::signal::ctrl_c() => Ok(130),
            },
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
