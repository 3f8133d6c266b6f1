//! The `filepipe` binary: all of it is the library's `main`, whose modules stay private.

fn main() -> std::process::ExitCode {
    filepipe::main()
}
