//! The `netsel` binary: a thin shell over [`netsel::cli`].

fn main() -> std::process::ExitCode {
    netsel::cli::main()
}
