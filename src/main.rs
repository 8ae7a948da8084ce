use relucompile::error::exit_code_of;

fn main() -> std::process::ExitCode {
    match relucompile::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(exit_code_of(&err) as u8)
        }
    }
}
