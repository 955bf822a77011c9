use clap::Parser;
use imagestream_archiver::cli::Cli;

fn main() {
    let _cli = Cli::parse();
}
