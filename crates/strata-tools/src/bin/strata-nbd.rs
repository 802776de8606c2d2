fn main() {
    std::process::exit(strata_tools::nbd::main());
}
