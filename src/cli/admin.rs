//! `keygate admin …`: admin tokens for the key API and the console. The token goes to stdout
//! alone; the line to paste into `[admin] tokens` goes to stderr.

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Print a new admin token; stderr has the `{ name, hash }` entry for `[admin] tokens`
    Token {
        /// The token's name, as the audit log records who made each change
        #[arg(long)]
        name: String,
    },
}

pub fn run(command: AdminCommand) -> Result<(), String> {
    match command {
        AdminCommand::Token { name } => {
            if !crate::config::valid_admin_token_name(&name) {
                return Err("--name must be 1 to 64 letters, digits, '.', '_', ':', '@' or '-'".to_string());
            }
            let (token, line) =
                crate::admin::token::generate(&name).map_err(|e| format!("no OS randomness: {e}"))?;
            eprintln!(
                "add this entry to [admin] tokens in keygate.toml (the token itself is shown only this once):"
            );
            eprintln!("{line}");
            println!("{token}");
            Ok(())
        }
    }
}
