//! The `netsel` binary: a thin shell over [`netsel::cli`].

/// mimalloc instead of the system allocator: the proxies allocate per request and per
/// HTTP/2 stream, and under glibc malloc that was ~10 % of the h2c path's CPU.
#[cfg(feature = "server")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    netsel::cli::main()
}
