use clap::Parser;

fn main() {
    let cli = edgetune_cli::commands::Cli::parse();
    if let Err(e) = edgetune_cli::commands::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
