fn main() -> std::process::ExitCode {
    eprintln!("vmscale-agent is not implemented yet; see the open issue for the agent");
    std::process::ExitCode::FAILURE
}
