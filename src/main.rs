use relucompile::error::exit_code_of;

fn main() -> std::process::ExitCode {
    // tract's panics on graphs it cannot handle are caught and reported as errors; only a panic
    // elsewhere (a bug in relucompile) prints the usual message.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !relucompile::error::inside_tract() {
            default_hook(info)
        }
    }));
    match relucompile::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(exit_code_of(&err) as u8)
        }
    }
}
