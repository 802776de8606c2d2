fn main() {
    std::process::exit(strata_tools::daemon::main());
}
