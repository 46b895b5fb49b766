//! `handler`: the Dynamics Companion binary. All the work is in the library; this
//! file only turns the command line into a call and an exit code.

use std::process::ExitCode;

use clap::Parser;
use dynamics_companion::cli::Cli;

/// mimalloc instead of the C library's allocator: a request allocates and frees many small
/// buffers (headers, the body's chunks, the futures warp boxes), and under load the glibc
/// allocator's bookkeeping was about 14 % of the proxy's cycles (`perf`, BENCHMARKS.md);
/// the deployed binary links musl, whose allocator is slower still. Built without
/// transparent huge pages (`no_thp`): with them, mimalloc's eagerly committed arena made an
/// idle handler 30 MiB resident instead of 16 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    dynamics_companion::cli::run(cli)
}
