//! The `netsel` binary: a thin shell over [`netsel::cli`].

/// mimalloc instead of the system allocator: the proxies allocate per request and per
/// HTTP/2 stream, and under glibc malloc that was ~10 % of the h2c path's CPU. Built with
/// `no_thp`: where transparent huge pages are on, mimalloc's eagerly committed arenas
/// otherwise fill whole 2 MiB pages (an idle server's resident set was 29 MB instead of
/// 10 MB; the DNS benchmark's 65 MB instead of 33 MB, glibc's figure).
#[cfg(feature = "server")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    netsel::cli::main()
}
