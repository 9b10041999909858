//! The `dczoned` binary: the host agent (see `dczone-agent`).

fn main() -> std::process::ExitCode {
    dczone_agent::main()
}
