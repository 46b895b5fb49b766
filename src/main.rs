//! `handler`: the Dynamics Companion binary. All the work is in the library; this
//! file only turns the command line into a call and an exit code.

use std::process::ExitCode;

use clap::Parser;
use dynamics_companion::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    dynamics_companion::cli::run(cli)
}
