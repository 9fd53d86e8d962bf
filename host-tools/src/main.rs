use clap::Parser;

fn main() {
    // `edgetune inspect m.etm | head` closes stdout early: end quietly with the shell's
    // SIGPIPE status instead of a panic report.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    let cli = edgetune_cli::commands::Cli::parse();
    if let Err(e) = edgetune_cli::commands::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
