fn main() -> std::process::ExitCode {
    eprintln!("vmscale-informant is not implemented yet; see the open issue for the informant");
    std::process::ExitCode::FAILURE
}
